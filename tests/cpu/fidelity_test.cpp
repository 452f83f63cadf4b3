// The fidelity measures (cpu/fidelity.h): relative output error and softmax
// mass recall of a sparse step against dense fp64 attention, checked with the
// CPU kernel's real output (cpu/kernels.h, best ISA of this CPU) and against
// an fp64 recomputation written here that shares no code with the library;
// the policy's attended set; needle recall and depths on hand cases.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "kvtier/cpu/fidelity.h"
#include "kvtier/cpu/kernels.h"
#include "kvtier/cpu/reference.h"
#include "random.h"

using namespace kvtier;
using namespace kvtier::cpu;

namespace {

const bf16 kNanBf16 = bf16::from_bits(0x7fc0);

// One layer's context: q [q_heads][dim], K and V [kv_heads][tokens][dim], bf16.
struct Context {
  uint32_t kv_heads, q_heads, dim;
  uint64_t tokens;
  std::vector<bf16> q, k, v;

  Context(uint32_t kv, uint32_t group, uint32_t head_dim, uint64_t n, std::mt19937_64& gen)
      : kv_heads(kv), q_heads(kv * group), dim(head_dim), tokens(n),
        q(test::random_bf16(size_t{q_heads} * dim, gen, -2.f, 2.f)),
        k(test::random_bf16(kv * n * dim, gen)),
        v(test::random_bf16(kv * n * dim, gen)) {}

  Bf16View<2> qv() const { return Bf16View<2>(q, {q_heads, dim}); }
  ref::LayerKv kv() const {
    return {Bf16View<3>(k, {kv_heads, tokens, dim}), Bf16View<3>(v, {kv_heads, tokens, dim})};
  }
  uint32_t chunks(uint32_t chunk) const { return static_cast<uint32_t>((tokens + chunk - 1) / chunk); }
  std::vector<std::vector<uint32_t>> all_chunks(uint32_t chunk) const {
    std::vector<std::vector<uint32_t>> out(kv_heads);
    for (auto& list : out)
      for (uint32_t c = 0; c < chunks(chunk); ++c) list.push_back(c);
    return out;
  }
};

// The kernel's output over `lists` (chunks per KV head), from blocks laid out
// as a host slot stores them, rows past the tail poisoned, output poisoned.
PartialState kernel_output(const Context& ctx, uint32_t chunk, const std::vector<std::vector<uint32_t>>& lists,
                           double scale) {
  std::vector<std::vector<bf16>> slots;
  slots.reserve(ctx.kv_heads * size_t{ctx.chunks(chunk)});
  std::vector<std::vector<HostBlock>> blocks(ctx.kv_heads);
  for (uint32_t h = 0; h < ctx.kv_heads; ++h)
    for (uint32_t c : lists[h]) {
      const uint64_t first = uint64_t{c} * chunk, n = std::min<uint64_t>(chunk, ctx.tokens - first);
      std::vector<bf16> slot(2 * size_t{chunk} * ctx.dim, kNanBf16);
      std::copy_n(ctx.k.begin() + (h * ctx.tokens + first) * ctx.dim, n * ctx.dim, slot.begin());
      std::copy_n(ctx.v.begin() + (h * ctx.tokens + first) * ctx.dim, n * ctx.dim,
                  slot.begin() + size_t{chunk} * ctx.dim);
      slots.push_back(std::move(slot));
      blocks[h].push_back(HostBlock{slots.back().data(), static_cast<uint32_t>(n)});
    }
  PartialState out{ctx.q_heads, ctx.dim, test::poisoned<float>(size_t{ctx.q_heads} * ctx.dim),
                   test::poisoned<float>(ctx.q_heads)};
  attend_blocks(best_isa(), ctx.qv(), blocks, chunk, static_cast<float>(scale), out);
  return out;
}

// fp64 recomputation, independent of the library: softmax probabilities
// p[h][t] and the dense output o[h][d], each from plain loops.
struct Truth {
  std::vector<std::vector<double>> p;
  std::vector<std::vector<double>> o;
};

Truth truth(const Context& ctx, double scale) {
  const uint32_t group = ctx.q_heads / ctx.kv_heads;
  Truth t{std::vector<std::vector<double>>(ctx.q_heads), std::vector<std::vector<double>>(ctx.q_heads)};
  for (uint32_t h = 0; h < ctx.q_heads; ++h) {
    const uint64_t base = uint64_t{h / group} * ctx.tokens;
    std::vector<double>& p = t.p[h];
    for (uint64_t j = 0; j < ctx.tokens; ++j) {
      double s = 0;
      for (uint32_t d = 0; d < ctx.dim; ++d)
        s += double{ctx.q[size_t{h} * ctx.dim + d].to_float()} * ctx.k[(base + j) * ctx.dim + d].to_float();
      p.push_back(scale * s);
    }
    const double m = *std::max_element(p.begin(), p.end());
    double l = 0;
    for (double& x : p) l += (x = std::exp(x - m));
    for (double& x : p) x /= l;
    t.o[h].assign(ctx.dim, 0.0);
    for (uint64_t j = 0; j < ctx.tokens; ++j)
      for (uint32_t d = 0; d < ctx.dim; ++d) t.o[h][d] += p[j] * ctx.v[(base + j) * ctx.dim + d].to_float();
  }
  return t;
}

double truth_rel_error(const Truth& t, const PartialState& s) {
  double diff = 0, norm = 0;
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t d = 0; d < s.head_dim; ++d) {
      diff += std::pow(double{s.o_row(h)[d]} - t.o[h][d], 2);
      norm += std::pow(t.o[h][d], 2);
    }
  return std::sqrt(diff) / std::sqrt(norm);
}

double truth_recall(const Truth& t, uint32_t h, const std::vector<uint32_t>& chunks, uint32_t chunk) {
  double mass = 0;
  for (size_t j = 0; j < t.p[h].size(); ++j)
    if (std::find(chunks.begin(), chunks.end(), static_cast<uint32_t>(j / chunk)) != chunks.end()) mass += t.p[h][j];
  return mass;
}

PartialState to_f32(const PartialState64& s) {
  return {s.heads, s.head_dim, std::vector<float>(s.o.begin(), s.o.end()),
          std::vector<float>(s.lse.begin(), s.lse.end())};
}

void check_summary(const FidelityReport& r) {
  REQUIRE(!r.mass_recall.empty());
  double sum = 0;
  for (double m : r.mass_recall) sum += m;
  CHECK(r.mass_recall_min == *std::min_element(r.mass_recall.begin(), r.mass_recall.end()));
  CHECK(r.mass_recall_mean == doctest::Approx(sum / r.mass_recall.size()).epsilon(1e-15));
}

}  // namespace

TEST_CASE("fidelity: a full budget with the kernel's output is dense attention") {
  auto gen = test::rng(601);
  MESSAGE("kernel ISA: " << std::string(isa_name(best_isa())));
  for (uint64_t tokens : {uint64_t{1}, uint64_t{17}, uint64_t{1000}})
    for (uint32_t chunk : {16u, 64u})
      for (uint32_t group : {1u, 4u})
        for (uint32_t dim : {64u, 128u}) {
          CAPTURE(tokens);
          CAPTURE(chunk);
          CAPTURE(group);
          CAPTURE(dim);
          const Context ctx(2, group, dim, tokens, gen);
          const double scale = ref::default_scale(dim);
          const auto lists = ctx.all_chunks(chunk);
          const PartialState sparse = kernel_output(ctx, chunk, lists, scale);
          const Result<FidelityReport> r = measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, sparse, scale);
          REQUIRE_MESSAGE(r.ok(), r.status().to_string());
          CHECK(r->rel_error < 1e-5);
          REQUIRE(r->mass_recall.size() == ctx.q_heads);
          for (double m : r->mass_recall) CHECK(std::abs(m - 1) < 1e-12);
          CHECK(std::abs(r->mass_recall_min - 1) < 1e-12);
          CHECK(std::abs(r->mass_recall_mean - 1) < 1e-12);
          check_summary(*r);

          // The same budget reached through a policy that selects every far chunk.
          const SparsityPolicy policy{.sink_tokens = chunk, .window_tokens = 2 * uint64_t{chunk},
                                      .chunk_tokens = chunk, .topk_chunks = 1024};
          const ChunkRanges rg = chunk_ranges(policy, tokens);
          std::vector<std::vector<uint32_t>> far(ctx.kv_heads);
          for (auto& f : far)
            for (uint32_t c = rg.far_end; c-- > rg.far_begin;) f.push_back(c);
          const Result<AttendedSet> set = attended_set(policy, tokens, far);
          REQUIRE_MESSAGE(set.ok(), set.status().to_string());
          CHECK(set->chunks == lists);
          const Result<FidelityReport> r2 = measure_fidelity(ctx.qv(), ctx.kv(), *set, chunk, sparse, scale);
          REQUIRE_MESSAGE(r2.ok(), r2.status().to_string());
          CHECK(r2->rel_error == r->rel_error);
          CHECK(r2->mass_recall == r->mass_recall);
        }
}

TEST_CASE("fidelity: mass recall of two chunks with known scores") {
  // One KV head, two q heads, head_dim 2, scale 1, chunks of 2 tokens.
  // Keys (1,0) (0,0) | (2,0) (0,0). q0 = (1,0) scores 1, 0 | 2, 0; q1 = (0,1) scores 0 everywhere.
  const std::vector<bf16> q = {bf16::from_float(1), bf16::from_float(0), bf16::from_float(0), bf16::from_float(1)};
  std::vector<bf16> k(8, bf16::from_float(0)), v(8);
  k[0] = bf16::from_float(1);
  k[4] = bf16::from_float(2);
  for (size_t i = 0; i < v.size(); ++i) v[i] = bf16::from_float(0.25f * static_cast<float>(i + 1));
  const Bf16View<2> qv(q, {2, 2});
  const ref::LayerKv kv{Bf16View<3>(k, {1, 4, 2}), Bf16View<3>(v, {1, 4, 2})};
  const std::vector<std::vector<uint32_t>> first = {{0}};
  const PartialState sparse = to_f32(ref::attend_blocks(qv, ref::blocks_of(kv, 2, first), 1.0));
  const Result<FidelityReport> r = measure_fidelity(qv, kv, first, 2, sparse, 1.0);
  REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  const double e = std::exp(1.0);
  const double q0 = (e + 1) / (e * e + e + 2);
  REQUIRE(r->mass_recall.size() == 2);
  CHECK(r->mass_recall[0] == doctest::Approx(q0).epsilon(1e-14));
  CHECK(r->mass_recall[1] == doctest::Approx(0.5).epsilon(1e-14));
  CHECK(r->mass_recall_min == doctest::Approx(q0).epsilon(1e-14));
  CHECK(r->mass_recall_mean == doctest::Approx((q0 + 0.5) / 2).epsilon(1e-14));
  CHECK(r->mass_recall_min < 1);

  // rel_error by hand: dense o of head 0 weights the four values rows by
  // (e, 1, e^2, 1)/Z, the sparse o by (e, 1)/(e + 1); head 1 weights all
  // rows equally against the first two.
  auto row = [&](int t, int d) { return 0.25 * (2 * t + d + 1); };
  const double z = e * e + e + 2, w0[4] = {e / z, 1 / z, e * e / z, 1 / z}, s0[2] = {e / (e + 1), 1 / (e + 1)};
  double diff = 0, norm = 0;
  for (int d = 0; d < 2; ++d) {
    double dense0 = 0, sparse0 = 0, dense1 = 0, sparse1 = 0;
    for (int t = 0; t < 4; ++t) dense0 += w0[t] * row(t, d), dense1 += 0.25 * row(t, d);
    for (int t = 0; t < 2; ++t) sparse0 += s0[t] * row(t, d), sparse1 += 0.5 * row(t, d);
    diff += std::pow(sparse0 - dense0, 2) + std::pow(sparse1 - dense1, 2);
    norm += dense0 * dense0 + dense1 * dense1;
  }
  // The sparse output passed through fp32: 1e-6 of relative slack.
  CHECK(r->rel_error == doctest::Approx(std::sqrt(diff / norm)).epsilon(1e-6));
}

TEST_CASE("fidelity: a subset's error and recall equal an independent fp64 computation") {
  auto gen = test::rng(602);
  for (uint32_t chunk : {16u, 64u})
    for (uint32_t group : {1u, 4u})
      for (uint32_t dim : {64u, 128u}) {
        CAPTURE(chunk);
        CAPTURE(group);
        CAPTURE(dim);
        const Context ctx(2, group, dim, 1000, gen);
        const double scale = ref::default_scale(dim);
        // About a third of the chunks per KV head, at least one, in shuffled order.
        std::vector<std::vector<uint32_t>> lists(ctx.kv_heads);
        std::bernoulli_distribution pick(1.0 / 3);
        for (auto& list : lists) {
          for (uint32_t c = 0; c < ctx.chunks(chunk); ++c)
            if (pick(gen) || (c + 1 == ctx.chunks(chunk) && list.empty())) list.push_back(c);
          std::shuffle(list.begin(), list.end(), gen);
        }
        const PartialState sparse = kernel_output(ctx, chunk, lists, scale);
        const Result<FidelityReport> r = measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, sparse, scale);
        REQUIRE_MESSAGE(r.ok(), r.status().to_string());
        const Truth t = truth(ctx, scale);
        const double expected = truth_rel_error(t, sparse);
        CHECK(expected > 1e-2);  // a real approximation, not rounding
        CHECK(r->rel_error == doctest::Approx(expected).epsilon(1e-9));
        for (uint32_t h = 0; h < ctx.q_heads; ++h) {
          const double want = truth_recall(t, h, lists[h / group], chunk);
          CHECK(std::abs(r->mass_recall[h] - want) < 1e-12);
          CHECK(r->mass_recall[h] < 1);
        }
        check_summary(*r);
      }
}

TEST_CASE("fidelity: a planted dominant chunk is recalled when attended and missed when not") {
  auto gen = test::rng(603);
  constexpr uint32_t kChunk = 64, kPlanted = 7;
  for (uint32_t group : {1u, 4u})
    for (uint32_t dim : {64u, 128u}) {
      CAPTURE(group);
      CAPTURE(dim);
      Context ctx(2, group, dim, 1000, gen);
      // Per KV head a direction u of +-1 entries; its q heads are u plus a
      // little noise, the planted chunk's keys are 1.5 u, so their scores
      // (~1.5 sqrt(dim)) dwarf the others' (~N(0, 0.6)).
      std::uniform_int_distribution<int> sign(0, 1);
      std::uniform_real_distribution<float> noise(-0.1f, 0.1f);
      for (uint32_t h = 0; h < ctx.kv_heads; ++h) {
        std::vector<float> u(dim);
        for (float& x : u) x = sign(gen) ? 1.f : -1.f;
        for (uint32_t g = 0; g < group; ++g)
          for (uint32_t d = 0; d < dim; ++d)
            ctx.q[(size_t{h} * group + g) * dim + d] = bf16::from_float(u[d] + noise(gen));
        for (uint32_t t = kPlanted * kChunk; t < (kPlanted + 1) * kChunk; ++t)
          for (uint32_t d = 0; d < dim; ++d) ctx.k[(h * ctx.tokens + t) * dim + d] = bf16::from_float(1.5f * u[d]);
      }
      const double scale = ref::default_scale(dim);
      const uint32_t last = ctx.chunks(kChunk) - 1;
      const std::vector<std::vector<uint32_t>> with(ctx.kv_heads, {0, kPlanted, last});
      std::vector<std::vector<uint32_t>> without(ctx.kv_heads);
      for (auto& list : without)
        for (uint32_t c = 0; c <= last; ++c)
          if (c != kPlanted) list.push_back(c);

      const Result<FidelityReport> hit =
          measure_fidelity(ctx.qv(), ctx.kv(), with, kChunk, kernel_output(ctx, kChunk, with, scale), scale);
      REQUIRE_MESSAGE(hit.ok(), hit.status().to_string());
      MESSAGE("planted attended: recall_min " << hit->mass_recall_min << ", rel_error " << hit->rel_error);
      CHECK(hit->mass_recall_min > 0.999);
      CHECK(hit->rel_error < 1e-2);

      const Result<FidelityReport> miss =
          measure_fidelity(ctx.qv(), ctx.kv(), without, kChunk, kernel_output(ctx, kChunk, without, scale), scale);
      REQUIRE_MESSAGE(miss.ok(), miss.status().to_string());
      MESSAGE("planted missed: recall_mean " << miss->mass_recall_mean << ", rel_error " << miss->rel_error);
      CHECK(miss->mass_recall_mean < 1e-3);
      CHECK(miss->rel_error > 0.5);
    }
}

TEST_CASE("fidelity: bad inputs are refused with what is wrong") {
  auto gen = test::rng(604);
  const Context ctx(2, 2, 64, 100, gen);
  const uint32_t chunk = 16;  // 7 chunks, the last of 4 tokens
  const double scale = ref::default_scale(64);
  const auto lists = ctx.all_chunks(chunk);
  const PartialState good = PartialState::empty(ctx.q_heads, ctx.dim);
  auto refused = [](const Result<FidelityReport>& r, const std::string& needle) {
    REQUIRE(!r.ok());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_MESSAGE(r.status().message().find(needle) != std::string::npos, r.status().message());
  };
  REQUIRE(measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, good, scale).ok());

  const std::vector<bf16> q3(3 * size_t{64});
  refused(measure_fidelity(Bf16View<2>(q3, {3, 64}), ctx.kv(), lists, chunk, good, scale), "q_heads=3");
  const std::vector<bf16> q32(4 * size_t{32});
  refused(measure_fidelity(Bf16View<2>(q32, {4, 32}), ctx.kv(), lists, chunk, good, scale), "q head_dim=32");
  const ref::LayerKv short_v{ctx.kv().k, Bf16View<3>(std::span(ctx.v).first(2 * 99 * 64), {2, 99, 64})};
  refused(measure_fidelity(ctx.qv(), short_v, lists, chunk, good, scale), "but V is 2x99x64");
  const ref::LayerKv empty{Bf16View<3>({}, {2, 0, 64}), Bf16View<3>({}, {2, 0, 64})};
  refused(measure_fidelity(ctx.qv(), empty, lists, chunk, good, scale), "tokens=0");
  refused(measure_fidelity(ctx.qv(), ctx.kv(), lists, 0, good, scale), "chunk_tokens=0");
  refused(measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, good, 0.0), "scale=0");
  refused(measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, good, std::nan("")), "scale=nan");
  refused(measure_fidelity(ctx.qv(), ctx.kv(), std::span(lists).first(1), chunk, good, scale),
          "1 attended lists for kv_heads=2");
  refused(measure_fidelity(ctx.qv(), ctx.kv(), std::vector<std::vector<uint32_t>>{{0}, {1, 7}}, chunk, good, scale),
          "KV head 1 lists attended chunk 7, but 100 tokens make 7 chunks of 16");
  refused(measure_fidelity(ctx.qv(), ctx.kv(), std::vector<std::vector<uint32_t>>{{0, 3, 3}, {}}, chunk, good, scale),
          "KV head 0 lists attended chunk 3 twice");
  refused(measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, PartialState::empty(ctx.q_heads, 32), scale),
          "sparse_output is 4x32 (q_heads x head_dim), q is 4x64");
  PartialState nan = good;
  nan.o[1 * 64 + 5] = std::numeric_limits<float>::quiet_NaN();
  refused(measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, nan, scale), "sparse_output o[1][5]=nan is not finite");
  PartialState torn = good;
  torn.lse.pop_back();
  refused(measure_fidelity(ctx.qv(), ctx.kv(), lists, chunk, torn, scale), "3 lse values");

  AttendedSet both{{{0, 1}, {0}}, {{1}, {2}}};
  refused(measure_fidelity(ctx.qv(), ctx.kv(), both, chunk, good, scale),
          "KV head 0 lists chunk 1 both as attended and as far field");
  AttendedSet far_out{{{0}, {0}}, {{1}, {9}}};
  refused(measure_fidelity(ctx.qv(), ctx.kv(), far_out, chunk, good, scale), "KV head 1 lists far-field chunk 9");
  AttendedSet fine{{{0}, {0}}, {{1, 2}, {3}}};
  CHECK(measure_fidelity(ctx.qv(), ctx.kv(), fine, chunk, good, scale).ok());
}

TEST_CASE("fidelity: chunk ranges and the attended set of a policy") {
  SparsityPolicy p{.sink_tokens = 16, .window_tokens = 32, .chunk_tokens = 16, .topk_chunks = 2};
  // 100 tokens: chunks 0..6 (the last holds 4 tokens); the window (tokens
  // 68..99) starts inside chunk 4, which it takes in whole.
  ChunkRanges r = chunk_ranges(p, 100);
  CHECK(r.chunks == 7);
  CHECK(r.far_begin == 1);
  CHECK(r.far_end == 4);
  // Short contexts: sinks and window overlap and no chunk is far.
  r = chunk_ranges(p, 20);
  CHECK(r.chunks == 2);
  CHECK(r.far_begin == 1);
  CHECK(r.far_end == 1);
  r = chunk_ranges(p, 0);
  CHECK(r.chunks == 0);
  CHECK(r.far_end == 0);

  const std::vector<std::vector<uint32_t>> selected = {{3, 2}, {}};
  Result<AttendedSet> set = attended_set(p, 100, selected);
  REQUIRE_MESSAGE(set.ok(), set.status().to_string());
  CHECK(set->chunks == std::vector<std::vector<uint32_t>>{{0, 2, 3, 4, 5, 6}, {0, 4, 5, 6}});
  CHECK(set->far_field == std::vector<std::vector<uint32_t>>{{}, {}});
  p.far_field = FarField::kSummary;
  set = attended_set(p, 100, selected);
  REQUIRE(set.ok());
  CHECK(set->far_field == std::vector<std::vector<uint32_t>>{{1}, {1, 2, 3}});

  auto message = [&](std::vector<std::vector<uint32_t>> sel) {
    const Result<AttendedSet> bad = attended_set(p, 100, sel);
    REQUIRE(!bad.ok());
    return bad.status().message();
  };
  CHECK(message({{4}}).find("KV head 0 selected chunk 4, which is not a far chunk (far chunks are [1, 4)") !=
        std::string::npos);
  CHECK(message({{}, {0}}).find("KV head 1 selected chunk 0, which is not a far chunk") != std::string::npos);
  CHECK(message({{2, 2}}).find("KV head 0 selected chunk 2 twice") != std::string::npos);
  p.chunk_tokens = 24;
  CHECK(!attended_set(p, 100, selected).ok());
}

TEST_CASE("fidelity: needle recall and depths") {
  CHECK(needle_recall({}) == 0);
  const std::vector<NeedleTrial> trials = {
      {5, {{1, 5, 9}, {2, 3}}},  // found by head 0 only
      {0, {{0}, {4, 0}}},        // found by both
      {7, {{}, {6, 8}}},         // missed by both
  };
  CHECK(needle_recall(trials) == doctest::Approx(3.0 / 6.0));
  CHECK(needle_recall(std::span(trials).first(2)) == doctest::Approx(3.0 / 4.0));

  CHECK(depths(0).empty());
  CHECK(depths(1) == std::vector<double>{0.0});
  CHECK(depths(2) == std::vector<double>{0.0, 1.0});
  CHECK(depths(5) == std::vector<double>{0.0, 0.25, 0.5, 0.75, 1.0});
  const std::vector<double> eleven = depths(11);
  REQUIRE(eleven.size() == 11);
  CHECK(eleven.front() == 0.0);
  CHECK(eleven.back() == 1.0);
  for (size_t i = 0; i < eleven.size(); ++i) CHECK(eleven[i] == doctest::Approx(0.1 * static_cast<double>(i)));

  CHECK(depth_token(0.0, 1000) == 0);
  CHECK(depth_token(1.0, 1000) == 999);
  CHECK(depth_token(0.5, 1001) == 500);
  CHECK(depth_token(0.5, 1) == 0);
}
