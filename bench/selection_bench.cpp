// `kvtier bench selection`: how much of the top-k selection survives from one
// decode step to the next, by query correlation (issue 6: real decoding has
// temporal locality, random queries have none), and needle recall over
// depths. Drives the synthetic attention model (runtime/synthetic_model.h)
// through the CPU scorer and top-k on one Llama-3.1-8B-shaped layer. The
// overlap is what `kvtier plan` assumes as --selection-overlap (0.6 by
// default); chance overlap, top-k / far blocks, is the baseline.
#include <oneapi/tbb/parallel_for.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "harness.h"
#include "kvtier/core/assert.h"
#include "kvtier/core/policy.h"
#include "kvtier/cpu/fidelity.h"
#include "kvtier/cpu/kernels.h"
#include "kvtier/runtime/selection_stats.h"
#include "kvtier/runtime/synthetic_model.h"
#include "suites.h"

namespace kvtier::bench {
namespace {

constexpr uint32_t kDecodeSteps = 64;
constexpr uint64_t kSeed = 20261128;
constexpr uint32_t kDepths = 11;  // 0%, 10%, ..., 100%
constexpr uint32_t kNeedleTokens = 16;

ModelShape one_layer() {
  ModelShape s = llama31_8b_shape();
  s.layers = 1;
  return s;
}

runtime::SyntheticModel make_model(uint64_t context, double rho, std::vector<runtime::Needle> needles = {}) {
  runtime::SyntheticModelOptions o;
  o.shape = one_layer();
  o.context_tokens = context;
  o.seed = kSeed;
  o.query_correlation = rho;
  o.needles = std::move(needles);
  auto m = runtime::SyntheticModel::create(std::move(o));
  KVT_ASSERT(m.ok(), m.status().to_string());
  return std::move(m).value();
}

// The summary table of layer 0 of `model`'s context, built block by block in
// parallel from regenerated K/V in the stored block layout.
cpu::SummaryTable summaries(const runtime::SyntheticModel& model, uint64_t context, const SparsityPolicy& policy) {
  const ModelShape& s = model.shape();
  const uint32_t chunk = policy.chunk_tokens, dim = s.head_dim, heads = s.kv_heads;
  const uint32_t blocks = chunk_ranges(policy, context).chunks;
  cpu::SummaryTable table(heads, blocks, dim, policy.summary_kind);
  tbb::parallel_for(uint32_t{0}, blocks, [&](uint32_t b) {
    const uint64_t first = uint64_t{b} * chunk;
    const uint64_t n = std::min<uint64_t>(chunk, context - first);
    std::vector<bf16> k(n * heads * dim), v(k.size()), block(2ull * chunk * dim);
    model.kv(0, first, n, k, v);
    for (uint32_t h = 0; h < heads; ++h) {
      for (uint64_t t = 0; t < n; ++t)
        for (uint32_t d = 0; d < dim; ++d) {
          block[t * dim + d] = k[(t * heads + h) * dim + d];
          block[(chunk + t) * dim + d] = v[(t * heads + h) * dim + d];
        }
      cpu::build_summary(cpu::best_isa(), cpu::HostBlock{block.data(), static_cast<uint32_t>(n)}, chunk, table, h, b);
    }
  });
  for (uint32_t b = 0; b < blocks; ++b)
    table.tokens(b) = static_cast<uint32_t>(std::min<uint64_t>(chunk, context - uint64_t{b} * chunk));
  return table;
}

// Summary scores of every (KV head, block) for decode step `step`'s query.
std::vector<float> step_scores(const runtime::SyntheticModel& model, const cpu::SummaryTable& table, uint64_t step) {
  const ModelShape& s = model.shape();
  std::vector<bf16> q(size_t{s.q_heads} * s.head_dim);
  model.decode_query(0, step, q);
  std::vector<float> scores(size_t{s.kv_heads} * table.blocks());
  cpu::score_summaries(cpu::best_isa(), Bf16View<2>(q, {s.q_heads, s.head_dim}), table,
                       static_cast<float>(model.softmax_scale()), cpu::ScoreRule::kMaxDot, 0, table.blocks(),
                       MutF32View<2>(scores, {s.kv_heads, table.blocks()}));
  return scores;
}

// Top-k of every KV head from `scores`.
std::vector<std::vector<uint32_t>> top(const std::vector<float>& scores, const cpu::SummaryTable& table,
                                       uint32_t kv_heads, uint32_t k, const ChunkRanges& r) {
  std::vector<std::vector<uint32_t>> out(kv_heads);
  for (uint32_t h = 0; h < kv_heads; ++h)
    cpu::select_topk(F32View<2>(scores, {kv_heads, table.blocks()}), h, k, r.far_begin, r.far_end, out[h]);
  return out;
}

// Top-k of every KV head for decode step `step`'s query.
std::vector<std::vector<uint32_t>> select(const runtime::SyntheticModel& model, const cpu::SummaryTable& table,
                                          const SparsityPolicy& policy, const ChunkRanges& r, uint64_t step) {
  return top(step_scores(model, table, step), table, model.shape().kv_heads, policy.topk_chunks, r);
}

// Mean over KV heads and steps of the share of a step's selection kept from the previous step.
double mean_overlap(const runtime::SyntheticModel& model, const cpu::SummaryTable& table, const SparsityPolicy& policy,
                    const ChunkRanges& r) {
  std::vector<runtime::OverlapMeter> meters(model.shape().kv_heads);
  for (uint64_t step = 0; step < kDecodeSteps; ++step) {
    const auto selected = select(model, table, policy, r, step);
    for (size_t h = 0; h < meters.size(); ++h) meters[h].add(selected[h]);
  }
  double sum = 0;
  for (const auto& m : meters) sum += m.mean();
  return sum / static_cast<double>(meters.size());
}

// The speculative-prefetch question: of the blocks a step selects that the
// previous step did not, the share the previous step ranked just below its
// top-k, in ranks [k, k + extra). A high share means prefetching those ranks
// takes NVMe reads off the next step's critical path.
double runner_up_hit_rate(const runtime::SyntheticModel& model, const cpu::SummaryTable& table,
                          const SparsityPolicy& policy, const ChunkRanges& r, uint32_t extra) {
  const uint32_t heads = model.shape().kv_heads;
  uint64_t fresh = 0, hits = 0;
  std::vector<std::vector<uint32_t>> previous, previous_wide;
  for (uint64_t step = 0; step < kDecodeSteps; ++step) {
    const std::vector<float> scores = step_scores(model, table, step);
    const auto selected = top(scores, table, heads, policy.topk_chunks, r);
    if (!previous.empty()) {
      for (size_t h = 0; h < selected.size(); ++h) {
        for (uint32_t b : selected[h]) {
          if (std::find(previous[h].begin(), previous[h].end(), b) != previous[h].end()) continue;
          ++fresh;
          hits += std::find(previous_wide[h].begin(), previous_wide[h].end(), b) != previous_wide[h].end();
        }
      }
    }
    previous = selected;
    previous_wide = top(scores, table, heads, policy.topk_chunks + extra, r);
  }
  return fresh == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(fresh);
}

// Needle recall over depths 0..100%: one needle per depth, each in its own
// context, queried at every step (the needle query is planted at step 0 here).
double needle_recall(uint64_t context, const SparsityPolicy& policy, const ChunkRanges& r) {
  std::vector<cpu::NeedleTrial> trials;
  for (double depth : cpu::depths(kDepths)) {
    runtime::Needle needle;
    needle.depth = depth;
    needle.tokens = kNeedleTokens;
    const runtime::SyntheticModel model = make_model(context, 0.9, {needle});
    const cpu::SummaryTable table = summaries(model, context, policy);
    const uint32_t block = model.needle_blocks(policy.chunk_tokens).at(0);
    // Sinks and window are always attended: a needle there counts as found.
    if (block < r.far_begin || block >= r.far_end) {
      trials.push_back({block, std::vector<std::vector<uint32_t>>(model.shape().kv_heads, {block})});
      continue;
    }
    trials.push_back({block, select(model, table, policy, r, 0)});
  }
  return cpu::needle_recall(trials);
}

}  // namespace

int run_selection(const SuiteArgs& args) {
  const uint64_t context = args.quick ? (uint64_t{1} << 16) : (uint64_t{1} << 18);
  const SparsityPolicy policy;  // the defaults: 128 sinks, 4096 window, 64-token chunks, top-64, bf16 mean keys
  const ChunkRanges r = chunk_ranges(policy, context);
  Report report("selection", {{"context_tokens", context},
                              {"shape", "one Llama-3.1-8B layer: 32 q heads, 8 KV heads, head dim 128"},
                              {"policy", to_string(policy)},
                              {"decode_steps", kDecodeSteps},
                              {"model", "synthetic attention model, seed " + std::to_string(kSeed) +
                                            ", key correlation 0.95, logit std 3, hidden 256"},
                              {"overlap", "share of a step's top-k kept from the previous step, mean over KV heads "
                                          "and steps (a statistic of one seeded run, not a timing)"}});
  const double chance = static_cast<double>(policy.topk_chunks) / (r.far_end - r.far_begin);
  report.add("selection_overlap_chance", chance, "fraction");
  const runtime::SyntheticModel keys_model = make_model(context, 0.0);
  const cpu::SummaryTable table = summaries(keys_model, context, policy);  // keys do not depend on rho
  for (const double rho : {0.0, 0.5, 0.9, 0.99}) {
    char name[64];
    std::snprintf(name, sizeof(name), "selection_overlap_rho_%g", rho);
    report.add(name, mean_overlap(make_model(context, rho), table, policy, r), "fraction", "selection_overlap_chance");
  }
  for (const double rho : {0.9, 0.99}) {
    const runtime::SyntheticModel model = make_model(context, rho);
    for (const uint32_t extra : {64u, 192u}) {
      char name[80];
      std::snprintf(name, sizeof(name), "runner_up_hit_rate_rho_%g_extra_%u", rho, extra);
      report.add(name, runner_up_hit_rate(model, table, policy, r, extra), "fraction");
    }
  }
  report.set_config("runner_up_hit_rate",
                    "of the blocks a step selects that the previous step did not, the share the previous step "
                    "ranked in [top-k, top-k + extra): what prefetching the runner-ups would have read ahead");
  report.set_config("needle", std::to_string(kNeedleTokens) + "-token needle at " + std::to_string(kDepths) +
                                  " depths 0..100% (one context each), strength 32, scored with decode step 0's query; recall over depths x KV heads");
  report.add("needle_recall", needle_recall(context, policy, r), "fraction");
  report.print(args);
  return 0;
}

}  // namespace kvtier::bench
