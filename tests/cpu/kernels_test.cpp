// The CPU kernels (cpu/kernels.h) against the fp64 oracle (cpu/reference.h)
// and fp64 recomputations, on every ISA this CPU has (each one it lacks is
// reported as skipped), with odd sizes, every chunk size, partly filled tail
// blocks, GQA groups 1/4/8 (and 12, which takes two passes), and outputs
// poisoned with NaN so that an unwritten element fails.
//
// Tolerances are the ones the arithmetic earns. fp32 sums of d products carry
// an error below d * 2^-24 * sum |terms| (in practice ~sqrt(d) times less), so
// dot products are checked to 1e-5 of sum |terms|, not of their value, which
// may cancel to ~0. The AVX512_BF16 path multiplies bf16 by bf16 with
// _mm512_dpbf16_ps: such products are exact in fp32, so that path earns the
// same bound and is held to it (a bf16-rounding bound, ~4e-3, would hide bugs).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "kvtier/cpu/kernels.h"
#include "kvtier/cpu/reference.h"
#include "random.h"

using namespace kvtier;
using namespace kvtier::cpu;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
const bf16 kNanBf16 = bf16::from_bits(0x7fc0);

// Every ISA this CPU runs, scalar always; each one it lacks is reported.
std::vector<Isa> isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (isa_available(isa)) out.push_back(isa);
    else MESSAGE("SKIPPED ISA " << std::string(isa_name(isa)) << ": not on this CPU or capped by KVTIER_ISA");
  }
  return out;
}

std::string name(Isa isa) { return std::string(isa_name(isa)); }

std::vector<bf16> random_q(uint32_t heads, uint32_t dim, std::mt19937_64& gen) {
  return test::random_bf16(size_t{heads} * dim, gen, -3.f, 3.f);
}

// Blocks as a host slot stores them: K [chunk][dim] then V [chunk][dim]. About
// a quarter are partly filled; rows past `tokens` hold NaN, so a kernel that
// reads them poisons its output.
struct BlockPool {
  uint32_t chunk, dim;
  std::vector<std::vector<bf16>> data;
  std::vector<uint32_t> tokens;

  BlockPool(size_t blocks, uint32_t chunk_tokens, uint32_t head_dim, std::mt19937_64& gen)
      : chunk(chunk_tokens), dim(head_dim) {
    std::uniform_int_distribution<uint32_t> partial(1, chunk - 1), coin(0, 3);
    for (size_t i = 0; i < blocks; ++i) {
      const uint32_t n = coin(gen) == 0 ? partial(gen) : chunk;
      std::vector<bf16> d(2 * size_t{chunk} * dim, kNanBf16);
      const std::vector<bf16> k = test::random_bf16(size_t{n} * dim, gen), v = test::random_bf16(size_t{n} * dim, gen);
      std::copy(k.begin(), k.end(), d.begin());
      std::copy(v.begin(), v.end(), d.begin() + size_t{chunk} * dim);
      data.push_back(std::move(d));
      tokens.push_back(n);
    }
  }
  HostBlock host(size_t i) const { return {data[i].data(), tokens[i]}; }
  ref::BlockKv ref(size_t i) const {
    const size_t n = tokens[i];
    const std::span<const bf16> all(data[i]);
    return {Bf16View<2>(all.subspan(0, n * dim), {n, dim}),
            Bf16View<2>(all.subspan(size_t{chunk} * dim, n * dim), {n, dim})};
  }
};

// Largest |a - b| over o relative to max |b|, and largest |lse_a - lse_b|;
// an infinite lse must match exactly.
struct Diff {
  double o_rel = 0, lse_abs = 0;
};

template <class A, class B>
Diff diff(const BasicPartialState<A>& a, const BasicPartialState<B>& b) {
  REQUIRE(a.o.size() == b.o.size());
  REQUIRE(a.lse.size() == b.lse.size());
  double scale = 0;
  for (B x : b.o) scale = std::max(scale, std::abs(static_cast<double>(x)));
  Diff d;
  for (size_t i = 0; i < a.o.size(); ++i) {
    const double e = std::abs(static_cast<double>(a.o[i]) - static_cast<double>(b.o[i]));
    d.o_rel = std::max(d.o_rel, std::isnan(e) ? kInf : e / std::max(scale, 1e-300));
  }
  for (size_t h = 0; h < a.lse.size(); ++h) {
    if (std::isinf(a.lse[h]) || std::isinf(b.lse[h])) {
      CHECK(static_cast<double>(a.lse[h]) == static_cast<double>(b.lse[h]));
      continue;
    }
    const double e = std::abs(static_cast<double>(a.lse[h]) - static_cast<double>(b.lse[h]));
    d.lse_abs = std::max(d.lse_abs, std::isnan(e) ? kInf : e);
  }
  return d;
}

PartialState poisoned_state(uint32_t heads, uint32_t dim) {
  return {heads, dim, test::poisoned<float>(size_t{heads} * dim), test::poisoned<float>(heads)};
}

// A summary table with random contents written directly (kmin <= kmax,
// tokens in [0, chunk] with some empty blocks).
SummaryTable random_table(uint32_t kv_heads, uint32_t blocks, uint32_t dim, SummaryKind kind, uint32_t chunk,
                          std::mt19937_64& gen) {
  SummaryTable t(kv_heads, blocks, dim, kind);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_int_distribution<uint32_t> n(0, chunk), coin(0, 9);
  for (uint32_t b = 0; b < blocks; ++b) t.tokens(b) = coin(gen) == 0 ? 0 : std::max(1u, n(gen));
  for (uint32_t h = 0; h < kv_heads; ++h)
    for (uint32_t b = 0; b < blocks; ++b)
      for (uint32_t d = 0; d < dim; ++d) {
        t.vmean(h, b)[d] = u(gen);
        if (kind == SummaryKind::kMeanBf16) t.kmean_bf16(h, b)[d] = bf16::from_float(u(gen));
        else t.kmean_f32(h, b)[d] = u(gen);
        if (kind == SummaryKind::kMinMaxF32) {
          const float a = u(gen), c = u(gen);
          t.kmin(h, b)[d] = std::min(a, c);
          t.kmax(h, b)[d] = std::max(a, c);
        }
      }
  return t;
}

double mean_key(const SummaryTable& t, uint32_t h, uint32_t b, uint32_t d) {
  return t.kind() == SummaryKind::kMeanBf16 ? t.kmean_bf16(h, b)[d].to_float() : t.kmean_f32(h, b)[d];
}

// fp64 score of block b for KV head h, and the magnitude sum |terms| that bounds its rounding.
struct RefScore {
  double score = -kInf, magnitude = 0;
};

RefScore ref_score(const std::vector<bf16>& q, uint32_t group, const SummaryTable& t, double scale, ScoreRule rule,
                   uint32_t h, uint32_t b) {
  const uint32_t dim = t.head_dim();
  RefScore r;
  for (uint32_t g = h * group; g < (h + 1) * group; ++g) {
    double s = 0, mag = 0;
    for (uint32_t d = 0; d < dim; ++d) {
      const double qd = q[size_t{g} * dim + d].to_float();
      const double term = rule == ScoreRule::kMinMaxBound ? std::max(qd * t.kmin(h, b)[d], qd * t.kmax(h, b)[d])
                                                          : qd * mean_key(t, h, b, d);
      s += term;
      mag += std::abs(term);
    }
    r.score = std::max(r.score, scale * s);
    r.magnitude = std::max(r.magnitude, std::abs(scale) * mag);
  }
  return r;
}

// fp64 far-field partial of q heads over blocks[h] (pseudo-token b: score
// scale * q . kmean_b + ln(tokens_b), value vmean_b).
PartialState64 ref_far_field(const std::vector<bf16>& q, uint32_t group, const SummaryTable& t,
                             const std::vector<std::vector<uint32_t>>& blocks, double scale) {
  const uint32_t dim = t.head_dim(), q_heads = group * t.kv_heads();
  PartialState64 out = PartialState64::empty(q_heads, dim);
  for (uint32_t g = 0; g < q_heads; ++g) {
    const uint32_t h = g / group;
    std::vector<double> s;
    for (uint32_t b : blocks[h]) {
      double dot = 0;
      for (uint32_t d = 0; d < dim; ++d) dot += double(q[size_t{g} * dim + d].to_float()) * mean_key(t, h, b, d);
      s.push_back(scale * dot + std::log(double(t.tokens(b))));
    }
    const double m = s.empty() ? -kInf : *std::max_element(s.begin(), s.end());
    if (m == -kInf) continue;
    double l = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      const double w = std::exp(s[i] - m);
      l += w;
      for (uint32_t d = 0; d < dim; ++d) out.o[size_t{g} * dim + d] += w * t.vmean(h, blocks[h][i])[d];
    }
    for (uint32_t d = 0; d < dim; ++d) out.o[size_t{g} * dim + d] /= l;
    out.lse[g] = m + std::log(l);
  }
  return out;
}

// Copies the mean key, mean value and token count of n blocks of KV head 0.
void copy_rows(const SummaryTable& from, uint32_t first, SummaryTable& to, uint32_t to_first, uint32_t n) {
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t a = first + i, b = to_first + i, dim = from.head_dim();
    if (from.kind() == SummaryKind::kMeanBf16) std::copy_n(from.kmean_bf16(0, a), dim, to.kmean_bf16(0, b));
    else std::copy_n(from.kmean_f32(0, a), dim, to.kmean_f32(0, b));
    std::copy_n(from.vmean(0, a), dim, to.vmean(0, b));
    to.tokens(b) = from.tokens(a);
  }
}

}  // namespace

TEST_CASE("kernels: ISA names and availability") {
  CHECK(isa_available(Isa::kScalar));
  CHECK(isa_available(best_isa()));
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    MESSAGE("ISA " << name(isa) << std::string(isa_available(isa) ? ": available" : ": not available"));
    // A faster ISA implies the slower ones.
    if (isa != Isa::kScalar && isa_available(isa)) CHECK(isa_available(static_cast<Isa>(static_cast<int>(isa) - 1)));
  }
  CHECK(isa_name(Isa::kAvx512Bf16) == "avx512_bf16");
}

TEST_CASE("kernels: SummaryTable layout and sizes") {
  SummaryTable f32(8, 5, 80, SummaryKind::kMeanF32);
  CHECK(f32.scoring_bytes() == 8ull * 5 * 80 * 4);
  CHECK(SummaryTable(8, 5, 80, SummaryKind::kMeanBf16).scoring_bytes() == 8ull * 5 * 80 * 2);
  CHECK(SummaryTable(8, 5, 80, SummaryKind::kMinMaxF32).scoring_bytes() == 8ull * 5 * 80 * 4 * 3);
  const SummaryTable bf(3, 7, 80, SummaryKind::kMeanBf16);
  const SummaryTable mm(3, 7, 80, SummaryKind::kMinMaxF32);
  for (uint32_t h = 0; h < 3; ++h)
    for (uint32_t b = 0; b < 7; ++b) {
      CHECK(reinterpret_cast<uintptr_t>(f32.kmean_f32(h % 8, b % 5)) % 64 == 0);
      CHECK(reinterpret_cast<uintptr_t>(bf.kmean_bf16(h, b)) % 64 == 0);
      CHECK(reinterpret_cast<uintptr_t>(mm.kmin(h, b)) % 64 == 0);
      CHECK(reinterpret_cast<uintptr_t>(mm.kmax(h, b)) % 64 == 0);
      CHECK(reinterpret_cast<uintptr_t>(bf.vmean(h, b)) % 64 == 0);
    }
}

TEST_CASE("kernels: build_summary equals an fp64 recomputation on every ISA") {
  auto gen = test::rng(101);
  for (Isa isa : isas())
    for (SummaryKind kind : {SummaryKind::kMeanF32, SummaryKind::kMeanBf16, SummaryKind::kMinMaxF32})
      for (uint32_t chunk : {16u, 64u, 128u})
        for (uint32_t dim : {64u, 80u, 128u}) {
          CAPTURE(name(isa));
          CAPTURE(summary_kind_name(kind));
          CAPTURE(chunk);
          CAPTURE(dim);
          const uint32_t kv_heads = 2, blocks = 17;
          const BlockPool pool(kv_heads * blocks, chunk, dim, gen);
          SummaryTable t(kv_heads, blocks, dim, kind);
          for (uint32_t h = 0; h < kv_heads; ++h)
            for (uint32_t b = 0; b < blocks; ++b) {
              // Poison every row the kernel must write.
              std::fill_n(t.vmean(h, b), dim, NAN);
              if (kind == SummaryKind::kMeanBf16) std::fill_n(t.kmean_bf16(h, b), dim, kNanBf16);
              else std::fill_n(t.kmean_f32(h, b), dim, NAN);
              if (kind == SummaryKind::kMinMaxF32) {
                std::fill_n(t.kmin(h, b), dim, NAN);
                std::fill_n(t.kmax(h, b), dim, NAN);
              }
              build_summary(isa, pool.host(h * blocks + b), chunk, t, h, b);
            }
          double worst_mean = 0, worst_vmean = 0;
          for (uint32_t h = 0; h < kv_heads; ++h)
            for (uint32_t b = 0; b < blocks; ++b) {
              const ref::BlockKv kv = pool.ref(h * blocks + b);
              const uint32_t n = pool.tokens[h * blocks + b];
              // Token counts are per block, shared by the heads: the last head's build wrote it.
              CHECK(t.tokens(b) == pool.tokens[(kv_heads - 1) * blocks + b]);
              for (uint32_t d = 0; d < dim; ++d) {
                double ks = 0, ka = 0, vs = 0, va = 0, lo = kInf, hi = -kInf;
                for (uint32_t i = 0; i < n; ++i) {
                  const double x = kv.k(i, d).to_float(), y = kv.v(i, d).to_float();
                  ks += x, ka += std::abs(x), vs += y, va += std::abs(y);
                  lo = std::min(lo, x), hi = std::max(hi, x);
                }
                // Rounding is relative to the mean magnitude: the mean itself may cancel to ~0.
                worst_vmean = std::max(worst_vmean, std::abs(t.vmean(h, b)[d] - vs / n) / (va / n));
                if (kind == SummaryKind::kMeanBf16) {
                  // Round-to-nearest-even of the mean, within one bf16 ulp of
                  // the correctly rounded one (fp32 then bf16 rounds twice).
                  const float want = bf16::from_float(static_cast<float>(ks / n)).to_float();
                  const float got = t.kmean_bf16(h, b)[d].to_float();
                  const float ulp = want == 0 ? 1e-30f : std::ldexp(1.f, std::ilogb(want) - 7);
                  CHECK(std::abs(got - want) <= ulp);
                } else {
                  worst_mean = std::max(worst_mean, std::abs(t.kmean_f32(h, b)[d] - ks / n) / (ka / n));
                }
                if (kind == SummaryKind::kMinMaxF32) {
                  CHECK(t.kmin(h, b)[d] == lo);
                  CHECK(t.kmax(h, b)[d] == hi);
                }
              }
            }
          CHECK(worst_mean < 1e-6);
          CHECK(worst_vmean < 1e-6);
        }
}

TEST_CASE("kernels: build_summary of every ISA is bit-identical") {
  auto gen = test::rng(102);
  const BlockPool pool(9, 64, 128, gen);
  SummaryTable want(1, 9, 128, SummaryKind::kMinMaxF32);
  for (uint32_t b = 0; b < 9; ++b) build_summary(Isa::kScalar, pool.host(b), 64, want, 0, b);
  for (Isa isa : isas()) {
    CAPTURE(name(isa));
    SummaryTable got(1, 9, 128, SummaryKind::kMinMaxF32);
    for (uint32_t b = 0; b < 9; ++b) build_summary(isa, pool.host(b), 64, got, 0, b);
    for (uint32_t b = 0; b < 9; ++b)
      for (uint32_t d = 0; d < 128; ++d) {
        CHECK(got.kmean_f32(0, b)[d] == want.kmean_f32(0, b)[d]);
        CHECK(got.kmin(0, b)[d] == want.kmin(0, b)[d]);
        CHECK(got.kmax(0, b)[d] == want.kmax(0, b)[d]);
        CHECK(got.vmean(0, b)[d] == want.vmean(0, b)[d]);
      }
  }
}

TEST_CASE("kernels: score_summaries equals fp64 for both rules on every ISA") {
  auto gen = test::rng(103);
  const std::vector<Isa> all = isas();
  for (SummaryKind kind : {SummaryKind::kMeanF32, SummaryKind::kMeanBf16, SummaryKind::kMinMaxF32})
    for (uint32_t blocks : {1u, 17u, 1000u})
      for (uint32_t dim : {64u, 80u, 128u})
        for (uint32_t group : {1u, 4u, 8u, 12u}) {
          const uint32_t kv_heads = group == 12 ? 1 : 3;
          const SummaryTable t = random_table(kv_heads, blocks, dim, kind, 64, gen);
          const std::vector<bf16> q = random_q(group * kv_heads, dim, gen);
          const Bf16View<2> qv(q, {group * kv_heads, dim});
          const float scale = static_cast<float>(ref::default_scale(dim));
          // A sub-range when there is one: the blocks outside must stay untouched.
          const uint32_t begin = blocks / 3, end = blocks - blocks / 5;
          std::vector<ScoreRule> rules{ScoreRule::kMaxDot};
          if (kind == SummaryKind::kMinMaxF32) rules.push_back(ScoreRule::kMinMaxBound);
          for (ScoreRule rule : rules) {
            std::vector<float> first;
            for (Isa isa : all) {
              CAPTURE(name(isa));
              CAPTURE(summary_kind_name(kind));
              CAPTURE(static_cast<int>(rule));
              CAPTURE(blocks);
              CAPTURE(dim);
              CAPTURE(group);
              std::vector<float> scores = test::poisoned<float>(size_t{kv_heads} * blocks);
              score_summaries(isa, qv, t, scale, rule, begin, end, MutF32View<2>(scores, {kv_heads, blocks}));
              double worst = 0;
              for (uint32_t h = 0; h < kv_heads; ++h)
                for (uint32_t b = 0; b < blocks; ++b) {
                  const float got = scores[size_t{h} * blocks + b];
                  if (b < begin || b >= end) {
                    CHECK(std::isnan(got));
                    continue;
                  }
                  const RefScore r = ref_score(q, group, t, scale, rule, h, b);
                  const double e = std::abs(got - r.score) / std::max(r.magnitude, 1e-30);
                  worst = std::max(worst, std::isnan(e) ? kInf : e);
                }
              CHECK(worst < 1e-5);
              // Every ISA agrees with the first (scalar) within the same bound.
              if (first.empty()) first = scores;
              double spread = 0;
              for (size_t i = 0; i < scores.size(); ++i)
                if (!std::isnan(first[i])) spread = std::max(spread, double(std::abs(scores[i] - first[i])));
              CHECK(spread < 1e-4);
            }
          }
        }
}

TEST_CASE("kernels: attend_blocks equals the fp64 reference on every ISA") {
  auto gen = test::rng(104);
  const std::vector<Isa> all = isas();
  for (uint32_t chunk : {16u, 64u, 128u})
    for (uint32_t dim : {64u, 80u, 128u})
      for (uint32_t group : {1u, 4u, 8u, 12u})
        for (uint32_t count : {1u, 17u, 1000u}) {
          if (dim == 80 && count == 1000) continue;  // 80 is about the pass layout, not about length
          const uint32_t kv_heads = count == 1000 || group == 12 ? 1 : 3;
          const BlockPool pool(40, chunk, dim, gen);
          const std::vector<bf16> q = random_q(group * kv_heads, dim, gen);
          const Bf16View<2> qv(q, {group * kv_heads, dim});
          // Each head attends `count` blocks drawn from the pool, in any order,
          // except the last head when there are several: it attends nothing.
          std::vector<std::vector<HostBlock>> lists(kv_heads);
          std::vector<std::vector<ref::BlockKv>> ref_lists(kv_heads);
          std::uniform_int_distribution<size_t> pick(0, pool.data.size() - 1);
          for (uint32_t h = 0; h < kv_heads; ++h)
            for (uint32_t i = 0; i < (kv_heads > 1 && h == kv_heads - 1 ? 0 : count); ++i) {
              const size_t j = pick(gen);
              lists[h].push_back(pool.host(j));
              ref_lists[h].push_back(pool.ref(j));
            }
          const double scale = ref::default_scale(dim);
          const PartialState64 want = ref::attend_blocks(qv, ref_lists, scale);
          std::vector<float> first;
          for (Isa isa : all) {
            CAPTURE(name(isa));
            CAPTURE(chunk);
            CAPTURE(dim);
            CAPTURE(group);
            CAPTURE(count);
            PartialState got = poisoned_state(group * kv_heads, dim);
            attend_blocks(isa, qv, lists, chunk, static_cast<float>(scale), got);
            const Diff d = diff(got, want);
            CHECK(d.o_rel < 1e-5);
            CHECK(d.lse_abs < 1e-5);
            if (first.empty()) first = got.o;
            double spread = 0;
            for (size_t i = 0; i < got.o.size(); ++i) spread = std::max(spread, double(std::abs(got.o[i] - first[i])));
            CHECK(spread < 1e-4);
          }
        }
}

TEST_CASE("kernels: attend_blocks over nothing is (0, -inf) without NaN") {
  std::vector<bf16> q(4 * 64, bf16::from_float(1.f));
  const std::vector<std::vector<HostBlock>> lists{{}, {HostBlock{nullptr, 0}}};
  for (Isa isa : isas()) {
    CAPTURE(name(isa));
    PartialState got = poisoned_state(4, 64);
    attend_blocks(isa, Bf16View<2>(q, {4, 64}), lists, 64, 0.125f, got);
    for (float x : got.o) CHECK(x == 0.f);
    for (float l : got.lse) CHECK(l == -std::numeric_limits<float>::infinity());
  }
}

TEST_CASE("kernels: attend_blocks ignores NaN rows past an odd tail block's valid tokens") {
  // Full blocks then a tail block with an odd number of valid tokens; every
  // row past them, K and V, is NaN. A kernel that pairs tokens (bf16 dot
  // products take two at a time) must pad the last pair without reading the
  // row after it: zero weight times NaN is still NaN.
  auto gen = test::rng(109);
  const std::vector<Isa> all = isas();
  for (uint32_t chunk : {16u, 64u, 128u})
    for (uint32_t tail : {1u, 3u, 17u, chunk - 1})
      for (uint32_t dim : {64u, 128u})
        for (uint32_t group : {1u, 4u, 8u}) {
          if (tail >= chunk) continue;
          std::vector<std::vector<bf16>> slots;
          std::vector<std::vector<HostBlock>> lists(1);
          std::vector<std::vector<ref::BlockKv>> ref_lists(1);
          for (uint32_t n : {chunk, chunk, tail}) {
            std::vector<bf16> slot(2 * size_t{chunk} * dim, kNanBf16);
            const std::vector<bf16> k = test::random_bf16(size_t{n} * dim, gen);
            const std::vector<bf16> v = test::random_bf16(size_t{n} * dim, gen);
            std::copy(k.begin(), k.end(), slot.begin());
            std::copy(v.begin(), v.end(), slot.begin() + size_t{chunk} * dim);
            slots.push_back(std::move(slot));
          }
          for (size_t i = 0; i < slots.size(); ++i) {
            const size_t n = i + 1 < slots.size() ? chunk : tail;
            const std::span<const bf16> s(slots[i]);
            lists[0].push_back(HostBlock{slots[i].data(), static_cast<uint32_t>(n)});
            ref_lists[0].push_back({Bf16View<2>(s.subspan(0, n * dim), {n, dim}),
                                    Bf16View<2>(s.subspan(size_t{chunk} * dim, n * dim), {n, dim})});
          }
          const std::vector<bf16> q = random_q(group, dim, gen);
          const Bf16View<2> qv(q, {group, dim});
          const double scale = ref::default_scale(dim);
          const PartialState64 want = ref::attend_blocks(qv, ref_lists, scale);
          for (Isa isa : all) {
            CAPTURE(name(isa));
            CAPTURE(chunk);
            CAPTURE(tail);
            CAPTURE(dim);
            CAPTURE(group);
            PartialState got = poisoned_state(group, dim);
            attend_blocks(isa, qv, lists, chunk, static_cast<float>(scale), got);
            CHECK(std::all_of(got.o.begin(), got.o.end(), [](float x) { return std::isfinite(x); }));
            CHECK(std::all_of(got.lse.begin(), got.lse.end(), [](float x) { return std::isfinite(x); }));
            const Diff d = diff(got, want);
            CHECK(d.o_rel < 1e-5);
            CHECK(d.lse_abs < 1e-5);
          }
        }
}

TEST_CASE("kernels: far_field equals an fp64 recomputation on every ISA") {
  auto gen = test::rng(105);
  const std::vector<Isa> all = isas();
  for (SummaryKind kind : {SummaryKind::kMeanF32, SummaryKind::kMeanBf16})
    for (uint32_t blocks : {1u, 17u, 1000u})
      for (uint32_t dim : {64u, 80u, 128u})
        for (uint32_t group : {1u, 4u, 8u, 12u}) {
          const uint32_t kv_heads = group == 12 ? 1 : 3;
          const SummaryTable t = random_table(kv_heads, blocks, dim, kind, 64, gen);
          const std::vector<bf16> q = random_q(group * kv_heads, dim, gen);
          const Bf16View<2> qv(q, {group * kv_heads, dim});
          // A random subset per head; with several heads the last lists nothing.
          std::vector<std::vector<uint32_t>> lists(kv_heads);
          std::bernoulli_distribution keep(0.7);
          for (uint32_t h = 0; h + (kv_heads > 1) < kv_heads; ++h)
            for (uint32_t b = 0; b < blocks; ++b)
              if (keep(gen) || blocks == 1) lists[h].push_back(b);
          const double scale = ref::default_scale(dim);
          const PartialState64 want = ref_far_field(q, group, t, lists, scale);
          for (Isa isa : all) {
            CAPTURE(name(isa));
            CAPTURE(summary_kind_name(kind));
            CAPTURE(blocks);
            CAPTURE(dim);
            CAPTURE(group);
            PartialState got = poisoned_state(group * kv_heads, dim);
            far_field(isa, qv, t, lists, static_cast<float>(scale), got);
            const Diff d = diff(got, want);
            CHECK(d.o_rel < 1e-5);
            CHECK(d.lse_abs < 1e-5);
          }
        }
}

TEST_CASE("kernels: far_field of blocks without tokens is empty") {
  SummaryTable t(1, 3, 64, SummaryKind::kMeanF32);  // all tokens 0, summaries 0
  std::vector<bf16> q(2 * 64, bf16::from_float(0.5f));
  const std::vector<std::vector<uint32_t>> lists{{0, 1, 2}};
  for (Isa isa : isas()) {
    CAPTURE(name(isa));
    PartialState got = poisoned_state(2, 64);
    far_field(isa, Bf16View<2>(q, {2, 64}), t, lists, 0.125f, got);
    for (float x : got.o) CHECK(x == 0.f);
    for (float l : got.lse) CHECK(l == -std::numeric_limits<float>::infinity());
  }
}

TEST_CASE("kernels: select_topk ranks by score, ties to the lower index") {
  const std::vector<float> s{9, 1, 3, 3, 2, 3, 7, 8, NAN, 3};  // one KV head, 10 blocks
  const F32View<2> scores(s, {1, 10});
  std::vector<uint32_t> out{42};
  select_topk(scores, 0, 3, 1, 8, out);  // blocks 0, 8, 9 are sinks/window: never chosen
  CHECK(out == std::vector<uint32_t>{7, 6, 2});
  select_topk(scores, 0, 4, 1, 8, out);
  CHECK(out == std::vector<uint32_t>{7, 6, 2, 3});
  select_topk(scores, 0, 100, 1, 8, out);  // k above the candidates: all of them, ranked
  CHECK(out == std::vector<uint32_t>{7, 6, 2, 3, 5, 4, 1});
  select_topk(scores, 0, 0, 1, 8, out);
  CHECK(out.empty());
  select_topk(scores, 0, 5, 4, 4, out);  // no far blocks at all
  CHECK(out.empty());
  select_topk(scores, 0, 10, 0, 10, out);  // NaN ranks last
  CHECK(out == std::vector<uint32_t>{0, 7, 6, 2, 3, 5, 9, 4, 1, 8});
}

TEST_CASE("kernels: select_topk equals a full stable sort") {
  // Few distinct scores (many ties) or continuous ones with infinities and
  // signed zeros, in random, ascending and descending order (ascending makes
  // every block a new candidate), some with NaNs. Ranges of 4k whole chunks
  // of 16 and more take the chunk-maxima bound; shorter ones stream.
  auto gen = test::rng(106);
  std::uniform_int_distribution<int> level(0, 20);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> special(0, 99);
  std::bernoulli_distribution nan(0.05);
  const auto draw = [&](bool continuous) {
    if (!continuous) return static_cast<float>(level(gen)) * 0.5f;
    switch (special(gen)) {
      case 0: return std::numeric_limits<float>::infinity();
      case 1: return -std::numeric_limits<float>::infinity();
      case 2: return -0.0f;
      case 3: return 0.0f;
      default: return normal(gen);
    }
  };
  // NaN ranks last; stable_sort keeps equal scores in index order.
  auto ranks_higher = [](float x, float y) {
    if (std::isnan(x) || std::isnan(y)) return !std::isnan(x) && std::isnan(y);
    return x > y;
  };
  for (bool continuous : {false, true})
  for (int order : {0, 1, 2})
    for (bool with_nan : {false, true})
      for (uint32_t blocks : {1u, 17u, 1000u, 4099u, 16384u})
        for (uint32_t k : {0u, 1u, 5u, 64u, 20000u}) {
          CAPTURE(continuous);
          CAPTURE(order);
          CAPTURE(with_nan);
          CAPTURE(blocks);
          CAPTURE(k);
          const uint32_t kv_heads = 2;
          std::vector<float> s(size_t{kv_heads} * blocks);
          for (float& x : s) x = with_nan && nan(gen) ? NAN : draw(continuous);
          for (uint32_t h = 0; h < kv_heads && order != 0; ++h) {
            const auto first = s.begin() + size_t{h} * blocks;
            auto ascending = [&](float x, float y) { return ranks_higher(y, x); };
            if (order == 1) std::sort(first, first + blocks, ascending);
            else std::sort(first, first + blocks, ranks_higher);
          }
          const uint32_t far_begin = blocks > 3 ? 2 : 0, far_end = blocks > 3 ? blocks - 1 : blocks;
          for (uint32_t h = 0; h < kv_heads; ++h) {
            const float* row = s.data() + size_t{h} * blocks;
            std::vector<uint32_t> want(far_end - far_begin);
            std::iota(want.begin(), want.end(), far_begin);
            std::stable_sort(want.begin(), want.end(),
                             [&](uint32_t a, uint32_t b) { return ranks_higher(row[a], row[b]); });
            want.resize(std::min<size_t>(k, want.size()));
            std::vector<uint32_t> got;
            select_topk(F32View<2>(s, {kv_heads, blocks}), h, k, far_begin, far_end, got);
            CHECK(got == want);
          }
        }
}

TEST_CASE("kernels: full-budget selection and exact attention equal dense attention") {
  auto gen = test::rng(107);
  const std::vector<Isa> all = isas();
  for (uint32_t group : {1u, 4u, 8u})
    for (uint32_t dim : {64u, 128u}) {
      const uint32_t kv_heads = 2, chunk = 64, sink_blocks = 2, window_blocks = 5;
      const uint64_t tokens = 40 * chunk + 17;  // a partly filled tail block
      const uint32_t blocks = static_cast<uint32_t>((tokens + chunk - 1) / chunk);
      const std::vector<bf16> k = test::random_bf16(kv_heads * tokens * dim, gen);
      const std::vector<bf16> v = test::random_bf16(kv_heads * tokens * dim, gen);
      const std::vector<bf16> q = random_q(group * kv_heads, dim, gen);
      const Bf16View<2> qv(q, {group * kv_heads, dim});
      const ref::LayerKv kv{Bf16View<3>(k, {kv_heads, tokens, dim}), Bf16View<3>(v, {kv_heads, tokens, dim})};
      const double scale = ref::default_scale(dim);
      const PartialState64 dense = ref::dense_attention(qv, kv, scale);
      // Copy the context into stored blocks: K then V per slot.
      std::vector<std::vector<bf16>> slots;
      std::vector<std::vector<HostBlock>> host(kv_heads);
      for (uint32_t h = 0; h < kv_heads; ++h)
        for (uint32_t c = 0; c < blocks; ++c) {
          const uint64_t first = uint64_t{c} * chunk, n = std::min<uint64_t>(chunk, tokens - first);
          std::vector<bf16> slot(2 * size_t{chunk} * dim, kNanBf16);
          std::copy_n(k.begin() + (h * tokens + first) * dim, n * dim, slot.begin());
          std::copy_n(v.begin() + (h * tokens + first) * dim, n * dim, slot.begin() + size_t{chunk} * dim);
          slots.push_back(std::move(slot));
          host[h].push_back(HostBlock{slots.back().data(), static_cast<uint32_t>(n)});
        }
      for (Isa isa : all) {
        CAPTURE(name(isa));
        CAPTURE(group);
        CAPTURE(dim);
        SummaryTable table(kv_heads, blocks, dim, SummaryKind::kMeanF32);
        for (uint32_t h = 0; h < kv_heads; ++h)
          for (uint32_t c = 0; c < blocks; ++c) build_summary(isa, host[h][c], chunk, table, h, c);
        std::vector<float> scores = test::poisoned<float>(size_t{kv_heads} * blocks);
        score_summaries(isa, qv, table, static_cast<float>(scale), ScoreRule::kMaxDot, 0, blocks,
                        MutF32View<2>(scores, {kv_heads, blocks}));
        const uint32_t far_begin = sink_blocks, far_end = blocks - window_blocks;
        // Sinks and window in one state, the selected far blocks in another, merged.
        std::vector<std::vector<HostBlock>> near(kv_heads), selected(kv_heads), everything(kv_heads);
        for (uint32_t h = 0; h < kv_heads; ++h) {
          std::vector<uint32_t> top;
          select_topk(F32View<2>(scores, {kv_heads, blocks}), h, far_end - far_begin, far_begin, far_end, top);
          REQUIRE(top.size() == far_end - far_begin);
          for (uint32_t c : top) selected[h].push_back(host[h][c]);
          for (uint32_t c = 0; c < blocks; ++c)
            if (c < far_begin || c >= far_end) near[h].push_back(host[h][c]);
          everything[h] = near[h];
          everything[h].insert(everything[h].end(), selected[h].begin(), selected[h].end());
        }
        PartialState one = poisoned_state(group * kv_heads, dim);
        attend_blocks(isa, qv, everything, chunk, static_cast<float>(scale), one);
        Diff d = diff(one, dense);
        CHECK(d.o_rel < 1e-5);
        CHECK(d.lse_abs < 1e-5);
        std::vector<PartialState> parts(2, poisoned_state(group * kv_heads, dim));
        attend_blocks(isa, qv, near, chunk, static_cast<float>(scale), parts[0]);
        attend_blocks(isa, qv, selected, chunk, static_cast<float>(scale), parts[1]);
        d = diff(merge_states<float>(parts), dense);
        CHECK(d.o_rel < 1e-5);
        CHECK(d.lse_abs < 1e-5);
      }
    }
}

TEST_CASE("kernels: a planted needle in a 1M-token context is always selected") {
  // One KV head, 4 q heads, 16K blocks of 64 tokens, head_dim 128. Keys are
  // N(0, 1) per dimension, so a block's mean key is N(0, 1/64): those
  // summaries are drawn directly. The needle block and its two neighbours are
  // built from real keys through build_summary; the needle's keys are
  // q0/|q0| * 2 + N(0, 1): each key alone barely leans towards q0 (cosine
  // ~0.17), but their mean does.
  auto gen = test::rng(108);
  constexpr uint32_t kBlocks = 1u << 14, kChunk = 64, kDim = 128, kGroup = 4, kTopk = 64;
  constexpr uint32_t kFarBegin = 2, kFarEnd = kBlocks - 64;  // 128 sink tokens, 4096 window tokens
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<bf16> q(kGroup * kDim);
  for (bf16& x : q) x = bf16::from_float(normal(gen));
  double norm = 0;
  for (uint32_t d = 0; d < kDim; ++d) norm += double(q[d].to_float()) * q[d].to_float();
  norm = std::sqrt(norm);
  const Bf16View<2> qv(q, {kGroup, kDim});
  const float scale = static_cast<float>(ref::default_scale(kDim));

  auto make_block = [&](bool needle) {
    std::vector<bf16> slot(2 * kChunk * kDim);
    for (uint32_t t = 0; t < kChunk; ++t)
      for (uint32_t d = 0; d < kDim; ++d) {
        const float lean = needle ? static_cast<float>(2.0 * q[d].to_float() / norm) : 0.f;
        slot[t * kDim + d] = bf16::from_float(lean + normal(gen));
        slot[(kChunk + t) * kDim + d] = bf16::from_float(normal(gen));
      }
    return slot;
  };
  const std::vector<bf16> needle = make_block(true), left = make_block(false), right = make_block(false);

  for (SummaryKind kind : {SummaryKind::kMeanF32, SummaryKind::kMeanBf16}) {
    SummaryTable table(1, kBlocks, kDim, kind);
    std::normal_distribution<float> mean(0.f, 1.f / 8);
    for (uint32_t b = 0; b < kBlocks; ++b) {
      table.tokens(b) = kChunk;
      for (uint32_t d = 0; d < kDim; ++d) {
        if (kind == SummaryKind::kMeanBf16) table.kmean_bf16(0, b)[d] = bf16::from_float(mean(gen));
        else table.kmean_f32(0, b)[d] = mean(gen);
      }
    }
    for (Isa isa : isas()) {
      std::uniform_real_distribution<double> jitter(0, 1);
      for (uint32_t i = 0; i < 10; ++i) {
        const double span = kFarEnd - kFarBegin - 2;  // depth +- 1 must stay far
        const uint32_t depth = kFarBegin + 1 + static_cast<uint32_t>((i + jitter(gen)) / 10 * span);
        CAPTURE(name(isa));
        CAPTURE(summary_kind_name(kind));
        CAPTURE(depth);
        // Plant the three built blocks, then put the drawn summaries back.
        SummaryTable saved(1, 3, kDim, kind);
        copy_rows(table, depth - 1, saved, 0, 3);
        build_summary(isa, HostBlock{left.data(), kChunk}, kChunk, table, 0, depth - 1);
        build_summary(isa, HostBlock{needle.data(), kChunk}, kChunk, table, 0, depth);
        build_summary(isa, HostBlock{right.data(), kChunk}, kChunk, table, 0, depth + 1);
        std::vector<float> scores = test::poisoned<float>(kBlocks);
        score_summaries(isa, qv, table, scale, ScoreRule::kMaxDot, 0, kBlocks, MutF32View<2>(scores, {1, kBlocks}));
        copy_rows(saved, 0, table, depth - 1, 3);
        std::vector<uint32_t> top;
        select_topk(F32View<2>(scores, {1, kBlocks}), 0, kTopk, kFarBegin, kFarEnd, top);
        CHECK(std::find(top.begin(), top.end(), depth) != top.end());
        CHECK(top.front() == depth);
      }
    }
  }
}
