// The main job on the synthetic attention-only model (issue 6): prefill a
// context of `context_tokens` through a Session (or several, for a batch),
// then decode, all layers every step, with the KV over GPU, host RAM and
// NVMe; measure speed, overlap, selection statistics and fidelity. `kvtier
// demo` and `kvtier bench e2e` are thin front ends over run_synthetic().
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/core/status.h"
#include "kvtier/runtime/session.h"

namespace kvtier::runtime {

struct SyntheticRunConfig {
  EngineOptions engine;              // shape, policy, budgets, nvme_dir, device, late policy, trace
  uint64_t context_tokens = 0;       // prefilled tokens per sequence
  uint32_t batch = 1;                // sequences decoding together (each its own context and seed)
  uint32_t decode_steps = 16;        // timed steps (all layers each), after warmup_steps
  uint32_t warmup_steps = 2;
  uint32_t prefill_block = 4096;     // query block of prefill
  double query_correlation = 0.9;    // rho of the synthetic model's decode queries
  // When >= 0: after the timed steps, a second timed phase on the same
  // prefilled contexts with queries of this correlation (e.g. 0, the
  // adversarial case), so both are measured without a second prefill.
  double second_query_correlation = -1;
  // When set and the engine's late policy is kWait: a further timed phase on
  // the same contexts with LatePolicy::kSummary and the first phase's query
  // correlation (verified at verify_every like the first), so the cost and
  // gain of not waiting for NVMe are measured without another prefill.
  bool late_summary_phase = false;
  uint32_t hidden = 64;              // latent dimensions of the synthetic model
  uint64_t seed = 1;
  // Dense fp64 check of sampled (step, layer) pairs: every verify_every-th
  // decode step, one layer (rotating). 0: none.
  uint32_t verify_every = 0;
  // Needle sweep after decoding: needles at depths 0-100% (needle_depths of
  // them), each checked for being selected by every KV head. 0: none.
  uint32_t needle_depths = 0;
  // Also run one decode step with topk covering every far chunk and report
  // its relative error against dense (must be rounding level).
  bool full_budget_check = false;
  // Called during prefill with (tokens done, tokens total) per sequence.
  std::function<void(uint64_t, uint64_t)> progress;
  // Called as each phase after prefill starts, with its name.
  std::function<void(const std::string&)> on_phase;
};

struct SyntheticRunReport {
  std::string backend;               // "cuda:0 (NVIDIA H200)" or "cpu"
  scheduler::Placement placement;    // of sequence 0 after prefill
  double prefill_seconds = 0;        // time inside Session::prefill (all sequences, all layers)
  double prefill_wall_seconds = 0;   // the same plus generating the synthetic q, k, v
  double prefill_tokens_per_s = 0;   // context tokens (all layers) per second, summed over the batch
  double decode_steps_per_s = 0;     // steps (all layers) per second, median over steps
  double decode_tokens_per_s = 0;    // decode_steps_per_s * batch
  double overlap_fraction = 0;       // share of timed decode wall time with >= 2 lanes busy (trace)
  double selection_overlap = 0;      // share of the selected set kept from the previous step
  double late_blocks_per_step = 0;   // per decode step (all layers), summed over the batch
  double mass_recall_p10 = 0, mass_recall_mean = 0;  // over verified (step, layer) q heads
  double rel_error_p50 = 0, rel_error_max = 0;       // over verified (step, layer)
  uint32_t verified = 0;
  double needle_recall = -1;         // -1: not measured
  double rel_error_full_budget = -1; // -1: not measured; worst over layers
  uint64_t full_budget_context = 0;  // context of that check (at most 32K tokens)
  // The second phase (second_query_correlation >= 0), as the first:
  double decode_steps_per_s_second = -1;
  double selection_overlap_second = -1;
  double late_blocks_per_step_second = -1;
  scheduler::ExecutorStats stats_second;
  // The late-summary phase (late_summary_phase), as the first; -1: not run.
  double decode_steps_per_s_late = -1;
  double late_blocks_per_step_late = -1;
  double mass_recall_p10_late = -1, mass_recall_mean_late = -1, rel_error_p50_late = -1;
  uint32_t verified_late = 0;
  scheduler::ExecutorStats stats_late;
  scheduler::ExecutorStats stats;    // decode steps only (warm-up excluded)
  scheduler::ExecutorStats stats_prefill;  // the prefill of every sequence
  std::vector<double> step_seconds;  // every timed step
  nlohmann::json to_json() const;
};

Result<SyntheticRunReport> run_synthetic(const SyntheticRunConfig& config);

}  // namespace kvtier::runtime
