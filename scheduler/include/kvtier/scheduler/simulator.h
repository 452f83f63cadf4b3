// The memory-tier simulator's first version (DESIGN.md section 9): will a
// model at a context length fit a machine's GPU, host RAM and NVMe, and how
// fast will it decode and prefill there?
//
// Capacity is exact arithmetic on the shapes. Speed is modeled: one decode
// step of one layer is planned by the real planner (planner.h) from modeled
// selections, and its task graph is timed on the one-queue-per-lane virtual
// clock (lane_schedule) with rates taken from the machine profile. Which tier
// each selected block is in is MODELED from the policy and a step-to-step
// selection overlap, unless measured shares are given
// (SimInputs::selection_shares); every modeled quantity and
// constant is listed in PlanReport::assumptions. docs/plan.md has the model's
// equations and its validation against measured runs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"
#include "kvtier/core/status.h"
#include "kvtier/scheduler/machine_profile.h"
#include "kvtier/scheduler/planner.h"

namespace kvtier::scheduler {

// The constants of the model, each stated in the report's assumptions.
struct SimConstants {
  double launch_us = 5.0;                  // one kernel or copy batch (merge kernel measured ~5 us on the H200)
  double gather_fraction_of_copy = 0.9;    // batched 32 KiB uploads vs one 32 MiB copy (measured 0.897)
  uint64_t link_large_copy_bytes = 32ull << 20;  // the single copy the gather is compared with
  uint32_t nvme_queue_depth = 32;          // the executor's io_uring depth
  double gpu_reserve_bytes_fixed = 2.0 * (1ull << 30);  // activations, workspace, CUDA context
  double gpu_reserve_fraction = 0.10;      // ... plus this share of GPU memory
  double host_budget_fraction = 0.80;      // share of host RAM kvtier may pin (summaries included)
  double prefill_attention_fraction = 0.285;  // block-sparse prefill kernel vs cuBLAS, measured on the H200
  uint64_t prefill_query_block_tokens = 8192;
  uint64_t max_context_tokens_searched = 1ull << 36;  // upper end of the largest-context search
};

// Where a step's selected blocks are, measured rather than modeled (from a
// trace, or kvtier bench e2e's blocks_per_layer_step): the shares of the
// selection that are GPU-resident and that are read from NVMe in a step; the
// rest is in host memory.
struct MeasuredSelection {
  double gpu_share = 0;
  double nvme_share = 0;
};

struct SimModel {
  std::string name;
  ModelShape shape;
  uint64_t parameters = 0;     // weight count (model GEMM FLOPs = 2 x parameters per token)
  uint64_t weights_bytes = 0;  // bf16 weights, held in GPU memory
  uint64_t max_positions = 0;  // the model's trained context (0: unknown); beyond it a warning
};

struct SimInputs {
  SimModel model;
  uint64_t context_tokens = 0;  // per sequence
  uint32_t batch = 1;           // sequences decoded together, each with its own context of context_tokens
  SparsityPolicy policy;
  MachineProfile machine;
  LatePolicy late = LatePolicy::kWait;
  std::optional<uint64_t> gpu_budget_bytes;   // GPU memory for KV (hot set + block cache); default: derived
  std::optional<uint64_t> host_budget_bytes;  // host RAM for KV blocks (summaries apart); default: derived
  std::optional<double> selection_overlap;    // step-to-step top-k overlap in [0, 1]; default kDefaultOverlap
  // Given: the selection's shares per tier are these, not modeled (the
  // overlap then only labels the report).
  std::optional<MeasuredSelection> selection_shares;
  // Of host RAM beyond host_budget_bytes, per sequence: the staging cache
  // that keeps NVMe blocks read by earlier steps (ExecutorOptions::
  // host_cache_bytes, one per sequence); unset models none, so that only
  // last step's reads are still in host memory.
  std::optional<uint64_t> host_cache_bytes;
  // The GPU scores the summaries where the executor would
  // (ExecutorOptions::score_on_gpu): mean-key summaries whose copy fits a
  // quarter of the GPU budget, which it then takes from the block cache.
  bool score_on_gpu = true;
  SimConstants constants;
};

// Measured by the synthetic model at query correlation 0.9, 64K context.
inline constexpr double kDefaultSelectionOverlap = 0.6;

// Planner rates from a profile (see the assumptions rates_from_profile adds).
CostRates rates_from_profile(const MachineProfile& machine, const ModelShape& shape, const SparsityPolicy& policy,
                             uint32_t batch = 1, const SimConstants& constants = {});

// Decode kernel's KV read rate as a share of the HBM copy rate at a batch
// size: measured 0.394 / 0.764 / 0.981 at batch 1 / 4 / 16 on the H200
// (130 blocks per (sequence, KV head)), linear in log2(batch) between, clamped.
double gpu_attend_fraction(uint32_t batch);

struct TierPlacement {
  uint64_t bytes = 0;
  uint64_t blocks = 0;
};

struct Placement {
  TierPlacement gpu, host, nvme;  // each block counted once, at the fastest tier that holds it
  uint64_t gpu_budget_bytes = 0;  // hot set + block cache
  uint64_t gpu_hot_bytes = 0;     // sinks + window + tail of every sequence
  uint64_t gpu_cache_blocks = 0;  // block-cache slots for far blocks
  uint64_t host_budget_bytes = 0; // for KV blocks
  uint64_t nvme_home_bytes = 0;   // what the NVMe file must hold: nvme + GPU-held blocks (homes, DESIGN.md 2)
  uint64_t gpu_summary_bytes = 0; // mean keys mirrored for the GPU scorer (0: the CPU scores)
};

// Capacity only: every number of the report that needs no timing.
struct Capacity {
  uint64_t kv_bytes = 0;       // all sequences of the batch
  uint64_t summary_bytes = 0;
  uint64_t block_bytes = 0;
  Placement placement;
  bool fits = false;
  std::string overflow_tier;   // "" when it fits; else "gpu", "host" or "nvme"
  std::string overflow_reason;
};

// Fit and placement of inputs.context_tokens. Errors name the bad input.
Result<Capacity> capacity(const SimInputs& inputs);

struct LaneUse {
  std::string lane;
  double busy_us = 0;       // per decode step, all layers
  double utilisation = 0;   // busy / step time, in [0, 1]
};

struct Traffic {
  uint64_t gpu_hbm_kv_bytes = 0;     // KV the GPU attends (hot + selected on the GPU)
  uint64_t gpu_hbm_weights_bytes = 0;  // full model only
  uint64_t host_ram_bytes = 0;       // summaries scored + blocks the CPU attends + blocks uploaded
  uint64_t pcie_h2d_bytes = 0;
  uint64_t pcie_d2h_bytes = 0;       // write-back of completed blocks, averaged over chunk_tokens steps
  uint64_t nvme_read_bytes = 0;
  uint64_t nvme_write_bytes = 0;     // averaged over chunk_tokens steps
};

struct SelectionModel {
  double overlap = 0;             // share of a step's top-k also selected last step
  uint32_t topk_blocks = 0;       // per (sequence, layer, KV head): min(topk_chunks, far blocks)
  double gpu_share = 0;           // of the selected blocks: in the GPU block cache
  double new_gpu_share = 0;       // of the newly selected blocks: in the GPU block cache
  double host_share = 0;          // in host memory (home or NVMe staging)
  double nvme_share = 0;          // read from NVMe this step
  double host_homed_far_share = 0;  // host KV / far KV (GPU-cached far blocks excluded)
  // Where NVMe homes exist (home-aware GPU eviction; simulator.cpp model_selection):
  double nvme_homed_share = 0;         // h' = NVMe-homed far blocks / far blocks
  double nvme_homed_cached_share = 0;  // kappa = NVMe-homed copies the GPU cache holds / NVMe-homed far blocks
  double staging_hit_share = 0;        // s = a new NVMe-homed selection found in the staging cache
  double staged_upload_share = 1;      // u = re-selected staged blocks the planner uploads (fixed point with it)
  bool measured = false;               // gpu/host/nvme shares given (SimInputs::selection_shares), not modeled
};

struct PlanReport {
  std::string model;
  std::string machine;
  uint64_t context_tokens = 0;
  uint32_t batch = 1;
  SparsityPolicy policy;
  LatePolicy late = LatePolicy::kWait;
  Capacity cap;
  uint64_t weights_bytes = 0;
  uint64_t gpu_memory_bytes = 0;
  uint64_t max_context_tokens_that_fits = 0;
  CostRates rates;
  SelectionModel selection;
  double step_us_attention = 0;     // decode step, all layers, attention + tiering
  double step_us_full_model = 0;    // plus weights and GEMMs
  double decode_tokens_per_s_attention = 0;
  double decode_tokens_per_s_full_model = 0;
  double late_blocks_per_step = 0;
  std::vector<LaneUse> lanes;       // attention + tiering step
  LaneUse bottleneck;
  LaneUse bottleneck_full_model;
  double prefill_seconds = 0;       // one sequence's prompt of context_tokens, full model (weight GEMMs included)
  double prefill_seconds_attention = 0;  // the same without the weight GEMMs: attention and tiering only
  LaneUse prefill_bottleneck;       // the lane that sets most prefill blocks' time
  // prefill_seconds_attention by part, seconds summed over the query blocks,
  // in the executor's order (its per-block timers: stage, score, pin,
  // attention and rest, home write wait): the block's K/V staged and copied
  // up; the query pass with scoring and top-k; the fetch of selected far
  // blocks the GPU cache misses; attention; and the part of the home writes
  // (with the fetch's NVMe reads) that outlasts the rest of the block.
  struct PrefillParts {
    double stage = 0, query = 0, fetch = 0, attention = 0, home_write_exposed = 0;
  } prefill_parts;
  Traffic traffic;                  // per decode step, whole batch
  std::vector<std::string> assumptions;
  std::vector<std::string> warnings;
};

// The whole prediction; errors name the bad input. When the context does not
// fit, the speed fields are those the same tiers would give were there room
// (placement still states where it overflows).
Result<PlanReport> simulate(const SimInputs& inputs);

// The report as one JSON object (keys documented in docs/plan.md).
nlohmann::json to_json(const PlanReport& report);

}  // namespace kvtier::scheduler
