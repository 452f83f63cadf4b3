// `kvtier plan` as the runtime offers it to the CLI: resolves a model (preset
// or config.json) and a machine (presets or profile files), runs the
// simulator (scheduler/simulator.h), and renders its reports as text, a sweep
// table and an SVG plot. docs/plan.md describes the model.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/core/policy.h"
#include "kvtier/core/status.h"
#include "kvtier/scheduler/simulator.h"

namespace kvtier::runtime {

using scheduler::LatePolicy;
using scheduler::MeasuredSelection;
using scheduler::PlanReport;

struct PlanRequest {
  std::string model;    // preset name or path of a Hugging Face config.json
  std::string machine;  // compose_machine spec: "rtx4090,ddr5-128g,nvme-gen4"
  uint64_t context_tokens = 0;
  uint32_t batch = 1;
  SparsityPolicy policy;
  LatePolicy late = LatePolicy::kWait;
  std::optional<uint64_t> gpu_budget_bytes;
  std::optional<uint64_t> host_budget_bytes;
  std::optional<uint64_t> host_cache_bytes;   // NVMe staging cache beyond the host budget (SimInputs)
  std::optional<double> selection_overlap;
  std::optional<scheduler::MeasuredSelection> selection_shares;  // scheduler::SimInputs::selection_shares
  bool score_on_gpu = true;  // scheduler::SimInputs::score_on_gpu
};

// The simulator's model input from a preset name or a config.json path;
// an unknown name lists the presets.
Result<scheduler::SimModel> resolve_model(std::string_view name_or_path);

// Policy overrides "key=value,..." applied to `base`: sink_tokens,
// window_tokens, chunk_tokens (tokens: 4K, 128), topk_chunks (blocks),
// summary (mean_f32, mean_bf16, minmax_f32), far_field (none, summary).
// Errors name the key; the result is validated.
Result<SparsityPolicy> parse_policy_overrides(std::string_view text, SparsityPolicy base = {});

// Measured selection shares "gpu=G,nvme=N" (each in [0, 1], G + N <= 1, both
// given once); the error quotes the text and says the form.
Result<MeasuredSelection> parse_selection_shares(std::string_view text);

// Resolves the model and machine and simulates.
Result<PlanReport> plan(const PlanRequest& request);

// A readable multi-line summary of a report.
std::string plan_text(const PlanReport& report);

// --sweep context=A:B[:steps]: contexts from A to B. Without steps, the
// powers of two in [A, B] (plus A and B); with steps (>= 2), that many
// log-spaced points rounded to whole chunks of `chunk_tokens`.
struct SweepSpec {
  uint64_t from_tokens = 0;
  uint64_t to_tokens = 0;
  uint32_t steps = 0;  // 0: powers of two
};
Result<SweepSpec> parse_sweep(std::string_view text);
std::vector<uint64_t> sweep_contexts(const SweepSpec& spec, uint32_t chunk_tokens);

// One line of a sweep plot: a machine's (or policy's) reports by context.
struct SweepSeries {
  std::string label;
  std::vector<PlanReport> points;
};

// The sweep as a fixed-width table, one row per (series, context).
std::string sweep_table(const std::vector<SweepSeries>& series);
// The sweep as JSON: {"sweep": [{"label", "points": [report...]}]}.
nlohmann::json sweep_json(const std::vector<SweepSeries>& series);
// A standalone SVG: decode tokens/s (log y) against context (log x), one
// colour per series, solid = full model, dashed = attention + tiering;
// contexts that do not fit are left out of the lines and marked with a
// cross on the x axis.
std::string sweep_svg(const std::vector<SweepSeries>& series);

}  // namespace kvtier::runtime
