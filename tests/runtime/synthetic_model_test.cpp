#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "kvtier/core/policy.h"
#include "kvtier/cpu/kernels.h"
#include "kvtier/runtime/selection_stats.h"
#include "kvtier/runtime/synthetic_model.h"
#include "random.h"

using namespace kvtier;
using namespace kvtier::runtime;

namespace {

// Small enough for a 64K-token context to be built in about a second.
ModelShape small_shape() {
  ModelShape s;
  s.layers = 2;
  s.q_heads = 4;
  s.kv_heads = 2;
  s.head_dim = 64;
  return s;
}

SyntheticModelOptions small_options(uint64_t seed) {
  SyntheticModelOptions o;
  o.shape = small_shape();
  o.context_tokens = 4096;
  o.seed = seed;
  o.hidden = 128;
  return o;
}

SyntheticModel make(const SyntheticModelOptions& o) {
  Result<SyntheticModel> m = SyntheticModel::create(o);
  INFO(m.status().to_string());
  REQUIRE(m.ok());
  return std::move(m).value();
}

Needle needle(double depth, uint32_t tokens, float strength, uint64_t query_step) {
  Needle n;
  n.depth = depth;
  n.tokens = tokens;
  n.strength = strength;
  n.query_step = query_step;
  return n;
}

bool same_bits(const std::vector<bf16>& a, size_t a_offset, const std::vector<bf16>& b, size_t n) {
  return std::memcmp(a.data() + a_offset, b.data(), n * sizeof(bf16)) == 0;
}

std::vector<bf16> keys_of(const SyntheticModel& m, uint32_t layer, uint64_t first, uint64_t n) {
  std::vector<bf16> k(n * m.shape().kv_heads * m.shape().head_dim);
  m.keys(layer, first, n, k);
  return k;
}

std::vector<bf16> decode_q(const SyntheticModel& m, uint32_t layer, uint64_t step) {
  std::vector<bf16> q(size_t{m.shape().q_heads} * m.shape().head_dim);
  m.decode_query(layer, step, q);
  return q;
}

// Sample lag-1 correlation of a mean-zero process, pooled over elements:
// sum_s x_s . x_{s+1} / sum_s x_s . x_s.
double lag1_correlation(const std::vector<std::vector<bf16>>& series) {
  double cross = 0.0, power = 0.0;
  for (size_t s = 0; s + 1 < series.size(); ++s)
    for (size_t e = 0; e < series[s].size(); ++e) {
      cross += double{series[s][e].to_float()} * series[s + 1][e].to_float();
      power += double{series[s][e].to_float()} * series[s][e].to_float();
    }
  return cross / power;
}

// One layer's context in token-major K, and its block summaries.
struct Context {
  std::vector<bf16> k;  // [tokens][kv_heads][head_dim]
  cpu::SummaryTable table;
};

Context build_context(const SyntheticModel& m, uint32_t layer, uint64_t tokens, uint32_t chunk_tokens) {
  const ModelShape& s = m.shape();
  const uint32_t rows = s.kv_heads * s.head_dim, blocks = static_cast<uint32_t>(tokens / chunk_tokens);
  Context c{std::vector<bf16>(tokens * rows), cpu::SummaryTable(s.kv_heads, blocks, s.head_dim, SummaryKind::kMeanF32)};
  std::vector<bf16> v(size_t{chunk_tokens} * rows), block(size_t{2} * chunk_tokens * s.head_dim);
  for (uint32_t b = 0; b < blocks; ++b) {
    const uint64_t first = uint64_t{b} * chunk_tokens;
    m.kv(layer, first, chunk_tokens, std::span<bf16>(c.k).subspan(first * rows, size_t{chunk_tokens} * rows), v);
    for (uint32_t h = 0; h < s.kv_heads; ++h) {
      // Stored layout: K [chunk_tokens][head_dim] then V [chunk_tokens][head_dim].
      for (uint32_t t = 0; t < chunk_tokens; ++t) {
        std::memcpy(&block[size_t{t} * s.head_dim], &c.k[(first + t) * rows + h * s.head_dim], s.head_dim * 2);
        std::memcpy(&block[(size_t{chunk_tokens} + t) * s.head_dim], &v[size_t{t} * rows + h * s.head_dim],
                    s.head_dim * 2);
      }
      cpu::build_summary(cpu::best_isa(), {block.data(), chunk_tokens}, chunk_tokens, c.table, h, b);
    }
  }
  return c;
}

// Top-k far blocks of each KV head for q, scored by mean keys (DESIGN.md section 10's default rule).
std::vector<std::vector<uint32_t>> select(const SyntheticModel& m, const Context& c, const std::vector<bf16>& q,
                                          uint32_t k, uint32_t far_begin, uint32_t far_end,
                                          std::vector<float>* scores_out = nullptr) {
  const ModelShape& s = m.shape();
  const uint32_t blocks = c.table.blocks();
  std::vector<float> scores(size_t{s.kv_heads} * blocks);
  cpu::score_summaries(cpu::best_isa(), Bf16View<2>(q, {s.q_heads, s.head_dim}), c.table,
                       static_cast<float>(m.softmax_scale()), cpu::ScoreRule::kMaxDot, 0, blocks,
                       MutF32View<2>(scores, {s.kv_heads, blocks}));
  std::vector<std::vector<uint32_t>> out(s.kv_heads);
  for (uint32_t h = 0; h < s.kv_heads; ++h)
    cpu::select_topk(F32View<2>(scores, {s.kv_heads, blocks}), h, k, far_begin, far_end, out[h]);
  if (scores_out != nullptr) *scores_out = std::move(scores);
  return out;
}

// Largest softmax weight of each q head's dense attention over the context, averaged over heads.
double mean_max_softmax_weight(const SyntheticModel& m, const Context& c, const std::vector<bf16>& q) {
  const ModelShape& s = m.shape();
  const uint64_t tokens = c.k.size() / (s.kv_heads * s.head_dim);
  double sum = 0.0;
  std::vector<double> logits(tokens);
  for (uint32_t g = 0; g < s.q_heads; ++g) {
    const uint32_t h = g / s.group_size();
    for (uint64_t t = 0; t < tokens; ++t) {
      double dot = 0.0;
      for (uint32_t e = 0; e < s.head_dim; ++e)
        dot += double{q[size_t{g} * s.head_dim + e].to_float()} * c.k[(t * s.kv_heads + h) * s.head_dim + e].to_float();
      logits[t] = dot * m.softmax_scale();
    }
    const double top = *std::max_element(logits.begin(), logits.end());
    double denom = 0.0;
    for (double l : logits) denom += std::exp(l - top);
    sum += 1.0 / denom;
  }
  return sum / s.q_heads;
}

}  // namespace

TEST_CASE("synthetic model: options are checked and the message names the field") {
  SyntheticModelOptions o = small_options(1);
  o.query_correlation = 1.5;
  Result<SyntheticModel> bad = SyntheticModel::create(o);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message().find("query_correlation") != std::string::npos);

  o = small_options(1);
  o.key_correlation = 0.999;
  CHECK(SyntheticModel::create(o).status().message().find("key_correlation") != std::string::npos);

  o = small_options(1);
  o.shape.head_dim = 96;
  CHECK(SyntheticModel::create(o).status().message().find("head_dim") != std::string::npos);

  o = small_options(1);
  o.needles.push_back(needle(0.0, 16, 24.f, 0));
  o.needles.back().first_token = 4090;
  const Status past = SyntheticModel::create(o).status();
  CHECK(past.code() == StatusCode::kInvalidArgument);
  CHECK(past.message().find("needle 0") != std::string::npos);
  CHECK(past.message().find("first_token") != std::string::npos);

  o = small_options(1);
  o.logit_std = 0.0;
  CHECK(SyntheticModel::create(o).status().message().find("logit_std") != std::string::npos);
}

TEST_CASE("synthetic model: shapes and the key filter window") {
  const SyntheticModel m = make(small_options(3));
  CHECK(m.shape() == small_shape());
  CHECK(m.softmax_scale() == doctest::Approx(1.0 / 8.0));
  // 0.95^W <= 1e-3 first at W = 135.
  CHECK(m.key_filter_taps() == 135);
  SyntheticModelOptions o = small_options(3);
  o.key_correlation = 0.0;
  CHECK(make(o).key_filter_taps() == 1);

  // Every element written: poison first, then no NaN and no all-zero row.
  std::vector<bf16> k(size_t{17} * 2 * 64, bf16::from_float(NAN)), v = k, q(size_t{17} * 4 * 64, bf16::from_float(NAN));
  m.kv(1, 1000, 17, k, v);
  m.prefill_query(1, 1000, 17, q);
  for (const auto* buf : {&k, &v, &q})
    for (bf16 x : *buf) REQUIRE(std::isfinite(x.to_float()));
  std::vector<bf16> dq = decode_q(m, 1, 5);
  for (bf16 x : dq) REQUIRE(std::isfinite(x.to_float()));
}

TEST_CASE("synthetic model: any token range regenerates the slice of a longer range bit for bit") {
  const SyntheticModel m = make(small_options(test::rng(11)()));
  const uint32_t rows = 2 * 64, q_rows = 4 * 64;
  const uint64_t c = 1000;  // crosses the 256-token tiles
  std::vector<bf16> k_all(c * rows), v_all(c * rows), q_all(c * q_rows);
  m.kv(0, 0, c, k_all, v_all);
  m.prefill_query(0, 0, c, q_all);
  for (auto [a, b] : {std::pair<uint64_t, uint64_t>{0, 1}, {255, 613}, {1, 999}, {511, 512}, {700, 1000}}) {
    CAPTURE(a);
    CAPTURE(b);
    std::vector<bf16> k((b - a) * rows), v((b - a) * rows), q((b - a) * q_rows);
    m.kv(0, a, b - a, k, v);
    m.prefill_query(0, a, b - a, q);
    CHECK(same_bits(k_all, a * rows, k, k.size()));
    CHECK(same_bits(v_all, a * rows, v, v.size()));
    CHECK(same_bits(q_all, a * q_rows, q, q.size()));
  }
  // keys() is kv() without the values.
  CHECK(same_bits(k_all, 300 * rows, keys_of(m, 0, 300, 77), 77 * rows));
  // Tokens appended while decoding (past the context) come from the same process.
  const std::vector<bf16> tail = keys_of(m, 0, 4000, 200);
  CHECK(same_bits(tail, 96 * rows, keys_of(m, 0, 4096, 50), 50 * rows));
}

TEST_CASE("synthetic model: Llama-3.1-8B shape regenerates across tiles") {
  SyntheticModelOptions o;
  o.shape = llama31_8b_shape();
  o.context_tokens = 1 << 20;
  o.seed = test::rng(17)();
  const SyntheticModel m = make(o);
  const uint32_t rows = 8 * 128;
  const std::vector<bf16> all = keys_of(m, 31, 200, 300);
  CHECK(same_bits(all, 50 * rows, keys_of(m, 31, 250, 250), 250 * rows));
  std::vector<bf16> q(32 * 128, bf16::from_float(NAN));
  m.decode_query(31, 3, q);
  for (bf16 x : q) REQUIRE(std::isfinite(x.to_float()));
}

TEST_CASE("synthetic model: outputs are a function of the seed, layer and position only") {
  const uint64_t seed = test::rng(12)();
  const SyntheticModel a = make(small_options(seed));
  const SyntheticModel b = make(small_options(seed));
  const SyntheticModel other = make(small_options(seed + 1));
  CHECK(keys_of(a, 1, 123, 40) == keys_of(b, 1, 123, 40));
  CHECK(keys_of(a, 1, 123, 40) != keys_of(other, 1, 123, 40));
  CHECK(keys_of(a, 0, 123, 40) != keys_of(a, 1, 123, 40));

  // Decode queries do not depend on the order in which steps are asked for
  // (the AR(1) over steps is replayed from checkpoints).
  const std::vector<bf16> late = decode_q(a, 0, 1000);
  for (uint64_t s = 0; s < 130; ++s) (void)decode_q(b, 0, s);
  CHECK(decode_q(b, 0, 1000) == late);
  CHECK(decode_q(a, 0, 129) == decode_q(b, 0, 129));
  CHECK(decode_q(a, 0, 7) != decode_q(other, 0, 7));
  CHECK(decode_q(a, 0, 7) != decode_q(a, 1, 7));
}

TEST_CASE("synthetic model: decode queries have lag-1 correlation rho") {
  // The pooled estimator sums over q_heads * head_dim = 256 elements that are
  // projections of hidden = 128 latent AR(1) series; with S steps its standard
  // error is about sqrt((1 - rho^2) / (S * n_eff)), n_eff <= 128 independent
  // series. Allowing n_eff = 32 and 5 standard errors, plus the estimator's
  // O(1/S) bias, keeps the check seed-proof and still tells 0.9 from 0.99.
  const uint32_t steps = 2000;
  for (double rho : {0.0, 0.5, 0.9, 0.99}) {
    SyntheticModelOptions o = small_options(test::rng(13)());
    o.query_correlation = rho;
    const SyntheticModel m = make(o);
    std::vector<std::vector<bf16>> series;
    for (uint32_t s = 0; s < steps; ++s) series.push_back(decode_q(m, 1, s));
    const double measured = lag1_correlation(series);
    const double tolerance = 5.0 * std::sqrt((1.0 - rho * rho) / (steps * 32.0)) + 3.0 / steps;
    MESSAGE("rho=" << rho << " measured lag-1 correlation " << measured << " (tolerance " << tolerance << ")");
    CHECK(std::abs(measured - rho) < tolerance);
  }
}

TEST_CASE("synthetic model: context keys have lag-1 correlation key_correlation") {
  // Same estimator over 4000 tokens; keys of one token are 128 projections of hidden = 128 series.
  for (double a : {0.0, 0.95}) {
    SyntheticModelOptions o = small_options(test::rng(14)());
    o.key_correlation = a;
    const SyntheticModel m = make(o);
    const uint32_t tokens = 4000, rows = 2 * 64;
    const std::vector<bf16> k = keys_of(m, 0, 0, tokens);
    std::vector<std::vector<bf16>> series(tokens);
    for (uint32_t t = 0; t < tokens; ++t) series[t].assign(k.begin() + t * rows, k.begin() + (t + 1) * rows);
    const double measured = lag1_correlation(series);
    const double tolerance = 5.0 * std::sqrt((1.0 - a * a) / (tokens * 32.0)) + 3.0 / tokens;
    MESSAGE("key_correlation=" << a << " measured " << measured);
    CHECK(std::abs(measured - a) < tolerance);
  }
}

TEST_CASE("synthetic model: needle blocks are the top-scoring blocks for their query at every depth") {
  const uint64_t tokens = 65536;
  const uint32_t chunk = 64, k_top = 64;
  SyntheticModelOptions o = small_options(test::rng(15)());
  o.context_tokens = tokens;
  const std::vector<double> depths = {0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0};
  for (size_t i = 0; i < depths.size(); ++i)
    o.needles.push_back(needle(depths[i], 64, 32.f, 100 + i));
  const SyntheticModel m = make(o);
  const Context c = build_context(m, 0, tokens, chunk);
  const std::vector<NeedlePlacement> placed = m.needle_placements(chunk);
  REQUIRE(placed.size() == depths.size());
  CHECK(placed.front().first_token == 0);
  CHECK(placed.back().first_token == tokens - 64);
  CHECK(placed.back().block == tokens / chunk - 1);
  CHECK(m.needle_blocks(chunk) == std::vector<uint32_t>{placed[0].block, placed[1].block, placed[2].block,
                                                        placed[3].block, placed[4].block, placed[5].block,
                                                        placed[6].block, placed[7].block, placed[8].block,
                                                        placed[9].block, placed[10].block});

  const uint32_t rows = 2 * 64;
  std::string ranks;
  for (size_t i = 0; i < depths.size(); ++i) {
    CAPTURE(depths[i]);
    const std::vector<bf16> q = decode_q(m, 0, 100 + i);
    // Plain dot products: every q head's best token is one of the needle's tokens.
    for (uint32_t g = 0; g < 4; ++g) {
      const uint32_t h = g / 2;
      uint64_t best = 0;
      double best_score = -1e30;
      for (uint64_t t = 0; t < tokens; ++t) {
        double dot = 0.0;
        for (uint32_t e = 0; e < 64; ++e)
          dot += double{q[g * 64 + e].to_float()} * c.k[t * rows + h * 64 + e].to_float();
        if (dot > best_score) best_score = dot, best = t;
      }
      CHECK(best >= placed[i].first_token);
      CHECK(best < placed[i].first_token + placed[i].tokens);
    }
    // Mean-key summaries: the needle's block is in every KV head's top-k
    // over the whole context (sinks and window included).
    std::vector<float> scores;
    const auto selected = select(m, c, q, k_top, 0, c.table.blocks(), &scores);
    for (uint32_t h = 0; h < 2; ++h) {
      const auto it = std::find(selected[h].begin(), selected[h].end(), placed[i].block);
      CHECK(it != selected[h].end());
      ranks += std::to_string(it - selected[h].begin()) + (h == 0 ? "/" : " ");
    }
  }
  MESSAGE("needle block rank (kv head 0/1) at depths 0..100%: " << ranks);
}

TEST_CASE("synthetic model: correlated queries keep the selection, random ones do not") {
  // 64K tokens, 64-token blocks, the default policy's sinks (2 blocks),
  // window (64 blocks) and top-64 far blocks per KV head.
  const uint64_t tokens = 65536;
  const uint32_t chunk = 64, blocks = 1024, steps = 64;
  const uint64_t seed = test::rng(16)();
  SyntheticModelOptions o = small_options(seed);
  o.context_tokens = tokens;
  o.query_correlation = 0.0;
  const SyntheticModel random_q = make(o);
  o.query_correlation = 0.9;
  const SyntheticModel correlated_q = make(o);
  // Keys do not depend on the query process: one context serves both.
  const Context c = build_context(correlated_q, 0, tokens, chunk);
  double overlap[2] = {0.0, 0.0};
  double max_weight = 0.0;
  for (int which = 0; which < 2; ++which) {
    const SyntheticModel& m = which == 0 ? random_q : correlated_q;
    std::vector<OverlapMeter> meters(2);
    for (uint32_t s = 0; s < steps; ++s) {
      const std::vector<bf16> q = decode_q(m, 0, s);
      const auto selected = select(m, c, q, 64, 2, blocks - 64);
      for (uint32_t h = 0; h < 2; ++h) meters[h].add(selected[h]);
      if (which == 1 && s % 16 == 0) max_weight += mean_max_softmax_weight(m, c, q) / (steps / 16);
    }
    overlap[which] = (meters[0].mean() + meters[1].mean()) / 2;
  }
  MESSAGE("step-to-step top-64 selection overlap at 64K tokens: rho=0 " << overlap[0] << ", rho=0.9 "
                                                                       << overlap[1]);
  MESSAGE("mean largest softmax weight of a decode query over 64K tokens (logit_std " << o.logit_std
                                                                                 << "): " << max_weight);
  // Independent queries overlap about as much as chance (64 of 958 far blocks,
  // plus blocks whose mean key is long); correlated ones keep most of the set.
  CHECK(overlap[0] < 0.35);
  CHECK(overlap[1] > overlap[0] + 0.25);
  CHECK(overlap[1] > 2.0 * overlap[0]);
}

TEST_CASE("selection overlap: share of the current set selected before") {
  CHECK(selection_overlap({1, 2, 3, 4}, {3, 4, 5, 6}) == doctest::Approx(0.5));
  CHECK(selection_overlap({}, {1, 2}) == 0.0);
  CHECK(selection_overlap({7, 1}, {1, 7}) == 1.0);
  CHECK(selection_overlap({1}, {}) == 1.0);
  CHECK(selection_overlap({9, 8, 7}, {1, 2, 3, 7}) == doctest::Approx(0.25));

  OverlapMeter meter;
  CHECK(meter.mean() == 0.0);
  meter.add({1, 2});
  CHECK(meter.transitions() == 0);
  meter.add({2, 3});  // 0.5
  meter.add({2, 3});  // 1.0
  CHECK(meter.transitions() == 2);
  CHECK(meter.mean() == doctest::Approx(0.75));
}

