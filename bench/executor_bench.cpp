// `kvtier bench executor`: the decode executor's own host time per layer
// step, for kvtier calibrate (host.prepare_us_per_list, plan_us_per_block,
// step_overhead_us of the machine profile) and for issue-6 work on it.
//
// One sequence of the Llama-3.1-8B attention shape, cut to two layers (every
// layer step does the same work), with budgets that keep every block in GPU
// slots: after prefill, decode steps at query correlation 0.9 are timed by
// the executor's phase timers. Every selected block is GPU-resident, so the
// plan node prices its cheapest case. The context is 256K tokens on a GPU
// (prefill takes seconds there), where scoring is a fair share of a 128K-1M
// step: the part of scoring and top-k that exceeds the scoring rate grows
// slowly with the context (H200 host: ~100 us at 32K, ~180-250 us at 128K-1M),
// and the calibration folds it into step_overhead_us. Without a GPU the
// executor runs on its CPU stand-in, as kvtier does there, at 64K tokens
// (12K and one layer with --quick), because prefill on the CPU takes minutes.
//
// A second run of the same shape keeps only the hot set and a small block
// cache in GPU slots, so the selected blocks that the cache misses are
// host-resident and the CPU attends those the planner keeps off the copy
// engine: its engine time per call beyond the bytes at the bulk rate is
// host.attend_call_us (a call of a few MiB pays the hand-off to the engine's
// workers and the merge of their states). Both runs use the default policy
// (far_field=none, late=wait), so every engine call is a block attention.
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>

#include "harness.h"
#include "kvtier/core/block.h"
#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"
#include "kvtier/runtime/synthetic_run.h"
#include "kvtier/scheduler/planner.h"
#include "suites.h"

namespace kvtier::bench {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr uint32_t kLayers = 2;
// Another layer count for the suite (1-32), to see whether its per-layer-step
// figures depend on it; kvtier calibrate never sets it.
constexpr const char* kLayersEnv = "KVTIER_EXECUTOR_LAYERS";

}  // namespace

int run_executor(const SuiteArgs& args) {
  runtime::SyntheticRunConfig run;
  run.engine.shape = llama31_8b_shape();
  run.engine.shape.layers = kLayers;
  const char* layers_text = std::getenv(kLayersEnv);
  const bool layers_given = layers_text != nullptr && *layers_text != '\0';
  if (layers_given) {
    char* end = nullptr;
    const unsigned long layers = std::strtoul(layers_text, &end, 10);
    if (*end != '\0' || layers < 1 || layers > 32) {
      std::cerr << "kvtier bench executor: " << kLayersEnv << "=" << layers_text
                << ": give a layer count from 1 to 32 (Llama-3.1-8B has 32), or unset it for the default "
                << kLayers << "\n";
      return 2;
    }
    run.engine.shape.layers = static_cast<uint32_t>(layers);
  }
  const bool gpu = gpu_present();
  run.context_tokens = gpu ? 262144 : args.quick ? 12288 : 65536;
  // --quick on the CPU stand-in: one layer (prefill attention on the CPU is
  // most of the run; kvtier calibrate --quick keeps to about a minute on 2 cores).
  if (!gpu && args.quick && !layers_given) run.engine.shape.layers = 1;
  // 128 KiB per token, the KV of all 32 layers (so every block stays in GPU
  // slots at any layer count), plus room for decode's tail blocks.
  run.engine.gpu_bytes = run.context_tokens * 128 * 1024 + kGiB;
  run.engine.host_bytes = run.engine.gpu_bytes;
  run.engine.cpu_threads = args.threads;
  run.decode_steps = args.quick ? 16 : 48;
  run.warmup_steps = 4;
  run.prefill_block = 8192;
  run.query_correlation = 0.9;
  run.seed = 20261128;
  const std::filesystem::path root =
      std::filesystem::path(args.dir) / ("kvtier-bench-executor-" + std::to_string(::getpid()));
  const WorkDir dir(root);
  run.engine.nvme_dir = dir.path();

  Report report("executor",
                {{"shape", "Llama-3.1-8B attention (32 q heads, 8 KV heads, head dim 128), " +
                               std::to_string(run.engine.shape.layers) + " layers"},
                 {"context_tokens", run.context_tokens},
                 {"policy", to_string(run.engine.policy)},
                 {"budgets", "gpu and host each 1 GiB more than the KV: every block in GPU slots"},
                 {"decode_steps", run.decode_steps},
                 {"query_correlation", run.query_correlation},
                 {"threads", args.threads},
                 {"statistic", "the executor's phase timers summed over the timed layer steps, per layer step"}});
  const Result<runtime::SyntheticRunReport> r = runtime::run_synthetic(run);
  if (!r.ok()) {
    std::cerr << "kvtier bench executor: " << r.status().to_string() << "\n";
    return 1;
  }
  // The host-resident run: GPU slots for the hot set of every layer and KV
  // head (sinks, window, tail) and about as many again for cached blocks.
  runtime::SyntheticRunConfig host_run = run;
  const BlockGeometry geometry(run.engine.shape, run.engine.policy.chunk_tokens);
  const uint64_t block_bytes = geometry.block_bytes();
  // Per list: sinks and window, the tail, and one more for an unaligned window.
  const uint64_t hot_blocks = uint64_t{run.engine.shape.layers} * run.engine.shape.kv_heads *
                              (chunk_ranges(run.engine.policy, run.context_tokens).hot() + 2);
  host_run.engine.gpu_bytes = 2 * hot_blocks * geometry.slot_bytes();
  const std::filesystem::path host_root = root / "host-resident";
  std::error_code ec;
  std::filesystem::create_directories(host_root, ec);
  host_run.engine.nvme_dir = host_root;
  const Result<runtime::SyntheticRunReport> h = runtime::run_synthetic(host_run);
  if (!h.ok()) {
    std::cerr << "kvtier bench executor (host-resident run): " << h.status().to_string() << "\n";
    return 1;
  }
  if (h->stats.cpu_calls == 0) {
    std::cerr << "kvtier bench executor: the host-resident run made no CPU attention call (gpu budget "
              << host_run.engine.gpu_bytes << " bytes)\n";
    return 1;
  }
  const scheduler::ExecutorStats& x = r->stats;
  if (x.layer_steps == 0 || x.selected_blocks == 0) {
    std::cerr << "kvtier bench executor: the run timed no layer step with a selection\n";
    return 1;
  }
  const double n = static_cast<double>(x.layer_steps);
  const ChunkRanges ranges = chunk_ranges(run.engine.policy, run.context_tokens + run.warmup_steps + run.decode_steps / 2);
  // Summary bytes the CPU scored per layer step (none where the GPU scored:
  // then the wait for its scores is a device wait, not host time).
  const double cpu_scored = 1.0 - std::min(1.0, static_cast<double>(x.gpu_scored) / n);
  const double score_bytes = cpu_scored * static_cast<double>(ranges.far_end - ranges.far_begin) *
                             run.engine.shape.kv_heads *
                             scheduler::summary_row_bytes(run.engine.shape, run.engine.policy.summary_kind);
  report.set_config("backend", r->backend);
  report.add("executor_layer_step_us", x.decode_us / n, "us");
  report.add("executor_prepare_us", (x.prepare_us - x.gpu_score_wait_us) / n, "us", "executor_layer_step_us");
  report.add("executor_gpu_score_wait_us", x.gpu_score_wait_us / n, "us", "executor_layer_step_us");
  report.add("executor_score_us", x.score_us / n, "us", "executor_layer_step_us");
  report.add("executor_plan_us", x.plan_us / n, "us", "executor_layer_step_us");
  report.add("executor_device_wait_us",
             (x.gpu_wait_us + x.cpu_attend_us + x.upload_wait_us + x.read_wait_us + x.gpu_score_wait_us) / n,
             "us", "executor_layer_step_us");
  report.add("executor_write_back_us", x.merge_us / n, "us", "executor_layer_step_us");
  report.add("executor_lists_per_layer_step", run.engine.shape.kv_heads, "lists");
  report.add("executor_selected_blocks_per_layer_step", static_cast<double>(x.selected_blocks) / n, "blocks");
  report.add("executor_gpu_resident_share", static_cast<double>(x.gpu_resident_blocks) / x.selected_blocks,
             "fraction");
  report.add("executor_score_bytes_per_layer_step", score_bytes, "bytes");
  // Scores ranked by the CPU's top-k per layer step (4 bytes a far block), whoever scored.
  report.add("executor_topk_bytes_per_layer_step",
             4.0 * static_cast<double>(ranges.far_end - ranges.far_begin) * run.engine.shape.kv_heads, "bytes");
  report.add("decode_steps_per_s", r->decode_steps_per_s, "steps/s");
  // The host-resident run's in-step CPU attention, per call of the engine.
  const scheduler::ExecutorStats& hx = h->stats;
  const double cpu_calls = static_cast<double>(hx.cpu_calls);
  report.set_config("host_resident_run", "gpu budget " + std::to_string(host_run.engine.gpu_bytes) +
                                             " bytes (twice the hot set), host budget as above");
  report.add("executor_host_cpu_call_us", hx.cpu_kernel_us / cpu_calls, "us");
  report.add("executor_host_cpu_bytes_per_call", static_cast<double>(hx.cpu_blocks) * block_bytes / cpu_calls, "bytes");
  report.add("executor_host_cpu_blocks_per_layer_step", static_cast<double>(hx.cpu_blocks) / hx.layer_steps,
             "blocks");
  report.add("executor_host_layer_step_us", hx.decode_us / hx.layer_steps, "us");
  // Prefill, per query block and layer: staging the block's K/V (append, GPU
  // copies, summaries, home writes started), the query pass with scoring and
  // top-k, and the rest (pins, the attention, the wait for home writes).
  const scheduler::ExecutorStats& pf = r->stats_prefill;
  const double calls = static_cast<double>(std::max<uint64_t>(pf.prefill_calls, 1));
  const double block_tokens = static_cast<double>(pf.prefill_tokens) / calls;
  const ModelShape& shape = run.engine.shape;
  report.add("executor_prefill_layer_block_ms", pf.prefill_us / calls / 1e3, "ms");
  report.add("executor_prefill_stage_ms", pf.prefill_stage_us / calls / 1e3, "ms", "executor_prefill_layer_block_ms");
  report.add("executor_prefill_query_ms", pf.prefill_score_us / calls / 1e3, "ms", "executor_prefill_layer_block_ms");
  report.add("executor_prefill_rest_ms",
             (pf.prefill_us - pf.prefill_stage_us - pf.prefill_score_us) / calls / 1e3, "ms",
             "executor_prefill_layer_block_ms");
  // Its attention alone (kernel calls, or the engine on the CPU stand-in), as
  // a rate: 4 x head_dim FLOPs per query-key pair and q head.
  report.add("executor_prefill_attention_ms", pf.prefill_attention_us / calls / 1e3, "ms",
             "executor_prefill_layer_block_ms");
  if (pf.prefill_attention_us > 0 && pf.prefill_attention_pairs > 0)
    report.add("executor_prefill_attention_tflops",
               4.0 * shape.head_dim * static_cast<double>(pf.prefill_attention_pairs) / (pf.prefill_attention_us * 1e6),
               "TFLOP/s");
  report.add("executor_prefill_kv_bytes_per_layer_block", block_tokens * shape.kv_heads * shape.head_dim * 2 * 2,
             "bytes");
  report.add("executor_prefill_q_bytes_per_layer_block", block_tokens * shape.q_heads * shape.head_dim * 2, "bytes");
  report.print(args);
  return 0;
}

}  // namespace kvtier::bench
