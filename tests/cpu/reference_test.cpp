// The fp64 reference against closed forms, and the property every later kernel
// relies on: attention over any partition of the context, merged, is dense
// attention.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kvtier/cpu/reference.h"
#include "random.h"

using namespace kvtier;
using namespace kvtier::cpu;

namespace {

struct Problem {
  uint32_t q_heads, kv_heads, head_dim;
  uint64_t tokens;
  std::vector<bf16> q, k, v;

  Problem(uint32_t qh, uint32_t kvh, uint32_t dim, uint64_t n, std::mt19937_64& gen)
      : q_heads(qh), kv_heads(kvh), head_dim(dim), tokens(n),
        q(test::random_bf16(size_t{qh} * dim, gen, -2.f, 2.f)),
        k(test::random_bf16(kvh * n * dim, gen)),
        v(test::random_bf16(kvh * n * dim, gen)) {}

  Bf16View<2> qv() const { return Bf16View<2>(q, {q_heads, head_dim}); }
  ref::LayerKv kv() const {
    return {Bf16View<3>(k, {kv_heads, tokens, head_dim}), Bf16View<3>(v, {kv_heads, tokens, head_dim})};
  }
};

// Largest |a - b| relative to max |b| over o, and largest |lse_a - lse_b|.
struct Diff {
  double o_rel = 0, lse_abs = 0;
};

template <class A, class B>
Diff diff(const BasicPartialState<A>& a, const BasicPartialState<B>& b) {
  REQUIRE(a.o.size() == b.o.size());
  double scale = 0;
  for (B x : b.o) scale = std::max(scale, std::abs(static_cast<double>(x)));
  Diff d;
  for (size_t i = 0; i < a.o.size(); ++i)
    d.o_rel = std::max(d.o_rel, std::abs(static_cast<double>(a.o[i]) - b.o[i]) / std::max(scale, 1e-300));
  for (size_t h = 0; h < a.lse.size(); ++h) {
    if (std::isinf(a.lse[h]) || std::isinf(b.lse[h])) {
      CHECK(a.lse[h] == b.lse[h]);
      continue;
    }
    d.lse_abs = std::max(d.lse_abs, std::abs(static_cast<double>(a.lse[h]) - b.lse[h]));
  }
  return d;
}

// Splits each KV head's chunks into `parts` random subsets (some may be empty).
std::vector<std::vector<std::vector<uint32_t>>> random_partition(uint32_t kv_heads, uint32_t chunks, uint32_t parts,
                                                                  std::mt19937_64& gen) {
  std::vector<std::vector<std::vector<uint32_t>>> out(parts, std::vector<std::vector<uint32_t>>(kv_heads));
  std::uniform_int_distribution<uint32_t> pick(0, parts - 1);
  for (uint32_t h = 0; h < kv_heads; ++h)
    for (uint32_t c = 0; c < chunks; ++c) out[pick(gen)][h].push_back(c);
  return out;
}

}  // namespace

TEST_CASE("reference: one token gives its value and its score") {
  auto gen = test::rng(1);
  Problem p(4, 1, 64, 1, gen);
  const double scale = ref::default_scale(64);
  const PartialState64 s = ref::dense_attention(p.qv(), p.kv(), scale);
  for (uint32_t h = 0; h < 4; ++h) {
    double dot = 0;
    for (uint32_t d = 0; d < 64; ++d) {
      dot += double(p.q[h * 64 + d].to_float()) * p.k[d].to_float();
      CHECK(s.o[h * 64 + d] == doctest::Approx(p.v[d].to_float()).epsilon(1e-15));
    }
    CHECK(s.lse[h] == doctest::Approx(scale * dot).epsilon(1e-14));
  }
}

TEST_CASE("reference: two tokens weigh their values by softmax") {
  // head_dim 64, q = e0, k0 = 0, k1 = 2*e0: scores 0 and 2*scale.
  std::vector<bf16> q(64, bf16{}), k(2 * 64, bf16{}), v(2 * 64, bf16{});
  q[0] = bf16::from_float(1.f);
  k[64] = bf16::from_float(2.f);
  for (uint32_t d = 0; d < 64; ++d) {
    v[d] = bf16::from_float(1.f);
    v[64 + d] = bf16::from_float(-3.f);
  }
  const double scale = 0.125, s1 = 2 * scale;
  const ref::LayerKv kv{Bf16View<3>(k, {1, 2, 64}), Bf16View<3>(v, {1, 2, 64})};
  const PartialState64 s = ref::dense_attention(Bf16View<2>(q, {1, 64}), kv, scale);
  const double w0 = 1 / (1 + std::exp(s1)), w1 = 1 - w0;
  CHECK(s.o[5] == doctest::Approx(w0 * 1 + w1 * -3).epsilon(1e-14));
  CHECK(s.lse[0] == doctest::Approx(std::log(1 + std::exp(s1))).epsilon(1e-14));
}

TEST_CASE("reference: an empty context is (0, -inf) and merging empties stays empty") {
  auto gen = test::rng(2);
  Problem p(8, 2, 128, 0, gen);
  const PartialState64 s = ref::dense_attention(p.qv(), p.kv(), ref::default_scale(128));
  for (double x : s.o) CHECK(x == 0.0);
  for (double l : s.lse) CHECK(l == -std::numeric_limits<double>::infinity());
  const std::vector<PartialState64> empties(3, s);
  const PartialState64 m = merge_states<double>(empties);
  for (double x : m.o) CHECK(x == 0.0);
  for (double l : m.lse) CHECK(std::isinf(l));
}

TEST_CASE("reference: any partition of the context, merged, equals dense attention") {
  auto gen = test::rng(3);
  for (uint32_t group : {1u, 4u, 8u})
    for (uint32_t dim : {64u, 128u})
      for (uint64_t tokens : {1ull, 17ull, 97ull, 1000ull})
        for (uint32_t chunk : {16u, 64u}) {
          const uint32_t kv_heads = tokens == 1000 ? 2 : 3;
          CAPTURE(group);
          CAPTURE(dim);
          CAPTURE(tokens);
          CAPTURE(chunk);
          Problem p(group * kv_heads, kv_heads, dim, tokens, gen);
          const double scale = ref::default_scale(dim);
          const PartialState64 dense = ref::dense_attention(p.qv(), p.kv(), scale);
          const uint32_t chunks = static_cast<uint32_t>((tokens + chunk - 1) / chunk);
          for (uint32_t parts : {1u, 2u, 5u}) {
            std::vector<PartialState64> states;
            for (const auto& part : random_partition(kv_heads, chunks, parts, gen))
              states.push_back(ref::attend_blocks(p.qv(), ref::blocks_of(p.kv(), chunk, part), scale));
            // An explicitly empty part must not change anything.
            states.push_back(PartialState64::empty(p.q_heads, dim));
            std::shuffle(states.begin(), states.end(), gen);
            const Diff d = diff(merge_states<double>(states), dense);
            CHECK(d.o_rel < 1e-12);
            CHECK(d.lse_abs < 1e-12);
          }
        }
}

TEST_CASE("reference: fp32 merge agrees with the fp64 merge to fp32 rounding") {
  auto gen = test::rng(4);
  Problem p(32, 8, 128, 1000, gen);
  const double scale = ref::default_scale(128);
  const PartialState64 dense = ref::dense_attention(p.qv(), p.kv(), scale);
  std::vector<PartialState> parts32;
  for (const auto& part : random_partition(8, 1000 / 64 + 1, 4, gen)) {
    const PartialState64 s = ref::attend_blocks(p.qv(), ref::blocks_of(p.kv(), 64, part), scale);
    PartialState s32{s.heads, s.head_dim, std::vector<float>(s.o.begin(), s.o.end()),
                     std::vector<float>(s.lse.begin(), s.lse.end())};
    parts32.push_back(std::move(s32));
  }
  const Diff d = diff(merge_states<float>(parts32), dense);
  CHECK(d.o_rel < 1e-5);
  CHECK(d.lse_abs < 1e-5);
}
