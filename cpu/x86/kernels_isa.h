// Private to cpu/: the per-ISA kernel entry points that kernels.cpp dispatches
// to (one KV head per call, raw pointers, arguments already checked), and the
// SIMD kernel bodies that the AVX2 and AVX-512 files instantiate with their own
// vector traits.
//
// Linkage rule. Each file under x86/ is compiled with its own -m flags, and
// anything it shares with other files through a weak (COMDAT) symbol -- an
// inline function, a template instantiation -- exists once after linking: the
// linker may keep the AVX-512 copy and hand it to the scalar path, which then
// faults on an AVX2 machine. So the ISA files call no kvtier inline functions
// and no standard-library templates (only intrinsics and C math), and the
// bodies below are templates over a traits type that each ISA file defines in
// an unnamed namespace, which gives every instantiation internal linkage.
#pragma once

#include <math.h>

#include <cstdint>

#include "kvtier/core/bf16.h"
#include "kvtier/core/policy.h"
#include "kvtier/cpu/kernels.h"

// For the small helpers of the hot loops (vector traits, Dot policies, one
// token's update): GCC's size heuristics otherwise leave some out of line, and
// then accumulator arrays passed by reference live in memory, not registers.
#define KVTIER_SIMD_INLINE [[gnu::always_inline]] inline

namespace kvtier::cpu::isa {

inline constexpr uint32_t kHeadDimMax = 256;  // the stack tiles below are sized for it
inline constexpr uint32_t kGroupMax = 8;      // q heads per pass; larger GQA groups are split
inline constexpr uint32_t kTileRows = kChunkTokensMax;  // scores per head per online-softmax step

// Elements between consecutive rows of a SummaryTable array: rows start on
// 64-byte boundaries (16 floats, 32 bf16).
constexpr uint64_t f32_row_stride(uint32_t head_dim) { return (uint64_t{head_dim} + 15) / 16 * 16; }
constexpr uint64_t bf16_row_stride(uint32_t head_dim) { return (uint64_t{head_dim} + 31) / 32 * 32; }

// The q rows of one KV head's group: [heads][head_dim] bf16, contiguous.
struct QGroup {
  const bf16* q;
  uint32_t heads;
  uint32_t head_dim;
};

// One KV head's rows of a SummaryTable (row b at base + b * stride); null
// where the table's kind has no such array. tokens is per block.
struct SummaryRows {
  const float* kmean;
  const bf16* kmean_bf16;
  const float* kmin;
  const float* kmax;
  const float* vmean;
  uint64_t stride_f32;
  uint64_t stride_bf16;
  const uint32_t* tokens;
  const float* ln_tokens;  // ln(n) for n in [0, kChunkTokensMax], ln(0) = -inf
};

// Where build_summary writes one block's summary; kmin/kmax null unless kMinMaxF32.
struct SummaryOut {
  float* kmean;
  float* kmin;
  float* kmax;
  float* vmean;
};

// Each ISA's entry points. build_summary needs tokens >= 1; scores, o and lse
// are the rows of this KV head (scores indexed by block, o [heads][head_dim]).
#define KVTIER_DECLARE_ISA_KERNELS(ns)                                                                    \
  namespace ns {                                                                                          \
  void build_summary(const bf16* k, const bf16* v, uint32_t tokens, uint32_t head_dim, const SummaryOut& out); \
  void score_summaries(const QGroup& q, const SummaryRows& rows, float scale, ScoreRule rule, uint32_t begin, \
                       uint32_t end, float* scores);                                                      \
  void attend_blocks(const QGroup& q, const HostBlock* blocks, uint64_t count, uint32_t chunk_tokens,      \
                     float scale, float* o, float* lse);                                                  \
  void far_field(const QGroup& q, const SummaryRows& rows, const uint32_t* blocks, uint64_t count, float scale, \
                 float* o, float* lse);                                                                   \
  }

KVTIER_DECLARE_ISA_KERNELS(scalar)
KVTIER_DECLARE_ISA_KERNELS(avx2)
KVTIER_DECLARE_ISA_KERNELS(avx512)
KVTIER_DECLARE_ISA_KERNELS(avx512bf16)

#undef KVTIER_DECLARE_ISA_KERNELS

// ---------------------------------------------------------------------------
// SIMD kernel bodies. S is a vector traits type:
//   V, kLanes, kAccRegs (vector registers a V accumulation may hold),
//   zero, set1, load(const float*), load(const bf16*) (widened), store,
//   add, sub, mul, div, min, max, fma(a, b, c) = a * b + c,
//   reduce_add, reduce_max, sum_lanes(v[kLanes]) (lane i = sum of v[i]),
//   exp (relative error < 1e-6; inputs below -87.3 give ~1e-38, not 0).
// A Dot policy computes q_g . row for the G heads of a pass:
//   Row, kStep, dim, load(Row, i), madd(acc, loaded, g, i), prefetch(Row).
// ---------------------------------------------------------------------------
namespace simd {

template <uint32_t G>
struct Group {};

// Calls f(Group<g>{}) for 1 <= g <= kGroupMax: the one place where a group
// size becomes a compile-time constant.
template <class F>
void with_group(uint32_t g, F&& f) {
  switch (g) {
    case 1: f(Group<1>{}); return;
    case 2: f(Group<2>{}); return;
    case 3: f(Group<3>{}); return;
    case 4: f(Group<4>{}); return;
    case 5: f(Group<5>{}); return;
    case 6: f(Group<6>{}); return;
    case 7: f(Group<7>{}); return;
    case 8: f(Group<8>{}); return;
    default: __builtin_trap();  // kernels.cpp splits groups into passes of at most kGroupMax
  }
}

// static: internal linkage, like everything the ISA files compile (see above).
static constexpr uint32_t min_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }
static inline float max_f32(float a, float b) { return a > b ? a : b; }

enum class CacheLevel { kL1, kL2 };

// Prefetches [p, p + bytes) into L1 or L2. Inline asm rather than
// __builtin_prefetch: GCC deems that builtin free of side effects, so its IPA
// pass marks a function that only prefetches (a lambda, before it is inlined)
// as const and deletes the calls.
template <CacheLevel level>
KVTIER_SIMD_INLINE static void prefetch_bytes(const void* p, uint64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (uint64_t i = 0; i < bytes; i += 64) {
    if constexpr (level == CacheLevel::kL1) asm volatile("prefetcht0 %0" : : "m"(c[i]));
    else asm volatile("prefetcht1 %0" : : "m"(c[i]));
  }
}

// Rows of T (fp32 mean keys; bf16 keys or mean keys, widened to fp32) against
// the pass's q widened to fp32. The products of two bf16 values are exact in
// fp32, so for bf16 rows only the sums round.
template <class S, class T>
struct DotWidened {
  using Row = const T*;
  static constexpr uint32_t kStep = S::kLanes;
  const float* q;  // [G][kHeadDimMax]
  uint32_t dim;
  KVTIER_SIMD_INLINE typename S::V load(Row r, uint32_t i) const { return S::load(r + i); }
  KVTIER_SIMD_INLINE typename S::V madd(typename S::V acc, typename S::V k, uint32_t g, uint32_t i) const {
    return S::fma(k, S::load(q + g * kHeadDimMax + i), acc);
  }
  KVTIER_SIMD_INLINE void prefetch(Row r) const { prefetch_bytes<CacheLevel::kL1>(r, uint64_t{dim} * sizeof(T)); }
};
template <class S>
using DotF32 = DotWidened<S, float>;
template <class S>
using DotBf16 = DotWidened<S, bf16>;

// The min/max bound sum_d max(q_d kmin_d, q_d kmax_d). Since kmin <= kmax it
// is q+ . kmax + q- . kmin with q+ = max(q, 0), q- = min(q, 0): per dimension
// one of the two products is zero, so two FMAs give exactly the selected term.
template <class S>
struct DotMinMax {
  struct Row {
    const float* lo;
    const float* hi;
  };
  struct Loaded {
    typename S::V lo, hi;
  };
  static constexpr uint32_t kStep = S::kLanes;
  const float* q_pos;  // [G][kHeadDimMax]
  const float* q_neg;
  uint32_t dim;
  KVTIER_SIMD_INLINE Loaded load(Row r, uint32_t i) const { return {S::load(r.lo + i), S::load(r.hi + i)}; }
  KVTIER_SIMD_INLINE typename S::V madd(typename S::V acc, const Loaded& k, uint32_t g, uint32_t i) const {
    acc = S::fma(k.hi, S::load(q_pos + g * kHeadDimMax + i), acc);
    return S::fma(k.lo, S::load(q_neg + g * kHeadDimMax + i), acc);
  }
  KVTIER_SIMD_INLINE void prefetch(Row r) const {
    prefetch_bytes<CacheLevel::kL1>(r.lo, uint64_t{dim} * sizeof(float));
    prefetch_bytes<CacheLevel::kL1>(r.hi, uint64_t{dim} * sizeof(float));
  }
};

// Widens the pass's q rows to fp32: qf[g][d] for g < heads, d < dim.
template <class S>
void widen_q(const bf16* q, uint32_t heads, uint32_t dim, float* qf) {
  for (uint32_t g = 0; g < heads; ++g)
    for (uint32_t d = 0; d < dim; d += S::kLanes) S::store(qf + g * kHeadDimMax + d, S::load(q + g * dim + d));
}

// Calls f(Group<G>{}, qf, g0) for each pass of at most kGroupMax of q's heads
// (first head g0), with the pass's q rows widened to fp32 in qf
// ([G][kHeadDimMax], which f may overwrite).
template <class S, class F>
void for_each_widened_pass(const QGroup& q, F&& f) {
  alignas(64) float qf[kGroupMax * kHeadDimMax];
  for (uint32_t g0 = 0; g0 < q.heads; g0 += kGroupMax) {
    const uint32_t heads = min_u32(kGroupMax, q.heads - g0);
    widen_q<S>(q.q + uint64_t{g0} * q.head_dim, heads, q.head_dim, qf);
    with_group(heads, [&]<uint32_t G>(Group<G> group) { f(group, qf, g0); });
  }
}

// out[g * out_stride + t] = scale * (q_g . row_at(t)) for t < n. R = kLanes / G
// rows go together so that their R * G dot products reduce in one transposed
// sum (sum_lanes) instead of one horizontal sum each; lane g * R + r holds
// head g's score of row r, so each head's R scores are copied as one piece.
//
// prefetch_at(t) is called for each row t the step works on (and past n up to
// the step's end), so that the caller can prefetch what it will need some
// distance ahead: a single core reaches memory bandwidth only with many more
// misses in flight than the hardware prefetchers start for a loop that also
// computes.
template <class S, uint32_t G, class Dot, class RowAt, class PrefetchAt>
void dot_rows(const Dot& dot, RowAt row_at, PrefetchAt prefetch_at, uint32_t n, float scale, float* out,
              uint32_t out_stride) {
  using V = typename S::V;
  constexpr uint32_t R = S::kLanes / G;
  for (uint32_t t0 = 0; t0 < n; t0 += R) {
    for (uint32_t r = 0; r < R; ++r) prefetch_at(t0 + r);
    typename Dot::Row rows[R];
    // Past the last row, re-read it rather than touch memory that may not exist.
    for (uint32_t r = 0; r < R; ++r) rows[r] = row_at(t0 + r < n ? t0 + r : n - 1);
    V acc[S::kLanes];
    for (V& a : acc) a = S::zero();
    for (uint32_t i = 0; i < dot.dim; i += Dot::kStep) {
#pragma GCC unroll 16
      for (uint32_t r = 0; r < R; ++r) {
        const auto k = dot.load(rows[r], i);
#pragma GCC unroll 8
        for (uint32_t g = 0; g < G; ++g) acc[g * R + r] = dot.madd(acc[g * R + r], k, g, i);
      }
    }
    alignas(64) float sums[S::kLanes];
    S::store(sums, S::mul(S::sum_lanes(acc), S::set1(scale)));
    if (t0 + R <= n) {
      for (uint32_t g = 0; g < G; ++g) __builtin_memcpy(out + g * out_stride + t0, sums + g * R, R * sizeof(float));
    } else {
      for (uint32_t g = 0; g < G; ++g)
        for (uint32_t r = 0; r < n - t0; ++r) out[g * out_stride + t0 + r] = sums[g * R + r];
    }
  }
}

// Rows (mean keys) prefetched ahead of the one being scored: 8 KiB of fp32 rows at head_dim 128.
inline constexpr uint32_t kPrefetchRows = 16;

// scores[b] for b in [begin, end): the max over the pass's G heads of
// scale * q_g . row_at(b), max-combined with what is there when `combine`
// (a group larger than kGroupMax is scored in several passes).
template <class S, uint32_t G, class Dot, class RowAt>
void score_rows(const Dot& dot, RowAt row_at, uint32_t begin, uint32_t end, float scale, bool combine,
                float* scores) {
  alignas(64) float s[G][kTileRows];
  for (uint32_t b0 = begin; b0 < end; b0 += kTileRows) {
    const uint32_t n = min_u32(kTileRows, end - b0);
    auto prefetch_at = [&](uint32_t t) {
      if (b0 + t + kPrefetchRows < end) dot.prefetch(row_at(b0 + t + kPrefetchRows));
    };
    dot_rows<S, G>(dot, [&](uint32_t t) { return row_at(b0 + t); }, prefetch_at, n, scale, &s[0][0], kTileRows);
    for (uint32_t t = 0; t < n; ++t) {
      float best = s[0][t];
      for (uint32_t g = 1; g < G; ++g) best = max_f32(best, s[g][t]);
      scores[b0 + t] = combine ? max_f32(scores[b0 + t], best) : best;
    }
  }
}

// Online softmax of G heads (DESIGN.md section 10) over tiles of scores:
// running max m, sum l and unnormalised output o per head, in fp32.
template <class S, uint32_t G>
class OnlineSoftmax {
  using V = typename S::V;
  static constexpr uint32_t kL = S::kLanes;
  // Accumulators of one pass over V: C vectors of dims per head, U tokens
  // unrolled, so that at least 8 independent FMA chains cover the latency
  // without spilling kAccRegs.
  static constexpr uint32_t kC = S::kAccRegs / G >= 2 ? 2 : 1;
  static constexpr uint32_t kU = 8 / (G * kC) >= 1 ? 8 / (G * kC) : 1;
  static constexpr uint32_t kU1 = 8 / G >= 1 ? 8 / G : 1;  // for a last pass of one vector

 public:
  explicit OnlineSoftmax(uint32_t dim) : dim_(dim) {
    for (uint32_t g = 0; g < G; ++g) {
      m_[g] = -INFINITY;
      l_[g] = 0;
      for (uint32_t d = 0; d < dim; d += kL) S::store(o_[g] + d, S::zero());
    }
  }

  // Adds n (>= 1) rows with scores s[g][t] and values value_at(t) (fp32 or
  // bf16 rows of dim). s must have room up to n rounded up to kLanes; it is
  // overwritten with the softmax weights. prefetch_at(t, d) is called as value
  // row t is read from dimension d on, for the caller to prefetch ahead.
  template <class ValueAt, class PrefetchAt>
  void add(float (*s)[kTileRows], uint32_t n, ValueAt value_at, PrefetchAt prefetch_at) {
    for (uint32_t g = 0; g < G; ++g) rescale_and_weigh(s[g], n, g);
    uint32_t d = 0;
    for (; d + kC * kL <= dim_; d += kC * kL) accumulate<kC, kU>(s, n, d, value_at, prefetch_at);
    for (; d < dim_; d += kL) accumulate<1, kU1>(s, n, d, value_at, prefetch_at);
  }

  // o [G][dim] normalised, lse [G]; a head that saw no finite score is (0, -inf).
  void finish(float* o, float* lse) const {
    for (uint32_t g = 0; g < G; ++g) {
      const bool empty = l_[g] == 0;
      const V inv = S::set1(empty ? 0.f : 1.f / l_[g]);
      for (uint32_t d = 0; d < dim_; d += kL) S::store(o + g * dim_ + d, S::mul(S::load(o_[g] + d), inv));
      lse[g] = empty ? -INFINITY : m_[g] + logf(l_[g]);
    }
  }

 private:
  // Moves head g to the new running max (scaling l and o by exp(m_old - m_new),
  // which is 0 while m_old is -inf) and turns its scores into weights.
  void rescale_and_weigh(float* s, uint32_t n, uint32_t g) {
    const uint32_t padded = (n + kL - 1) / kL * kL;
    for (uint32_t t = n; t < padded; ++t) s[t] = -INFINITY;
    V mv = S::set1(-INFINITY);
    for (uint32_t t = 0; t < padded; t += kL) mv = S::max(mv, S::load(s + t));
    const float m_new = max_f32(m_[g], S::reduce_max(mv));
    if (m_new == -INFINITY) {  // nothing finite yet: -inf - -inf would be NaN
      for (uint32_t t = 0; t < padded; ++t) s[t] = 0;
      return;
    }
    if (m_new != m_[g]) {
      const float shrink = expf(m_[g] - m_new);
      l_[g] *= shrink;
      for (uint32_t d = 0; d < dim_; d += kL) S::store(o_[g] + d, S::mul(S::load(o_[g] + d), S::set1(shrink)));
      m_[g] = m_new;
    }
    const V m = S::set1(m_new);
    for (uint32_t t = 0; t < padded; t += kL) S::store(s + t, S::exp(S::sub(S::load(s + t), m)));
    // exp(-inf) comes out as ~1e-38, not 0: the padding gets exact zeros.
    for (uint32_t t = n; t < padded; ++t) s[t] = 0;
    V sum = S::zero();
    for (uint32_t t = 0; t < padded; t += kL) sum = S::add(sum, S::load(s + t));
    l_[g] += S::reduce_add(sum);
  }

  // o[g][d0, d0 + C*kLanes) += sum_t p[g][t] v_t: each value vector is loaded
  // once for all G heads; U tokens go to separate accumulators. The tile is
  // summed from zero and then added to o, so over a long list the rounding
  // grows with sqrt(tiles) + sqrt(tile rows), not sqrt(all rows).
  template <uint32_t C, uint32_t U, class ValueAt, class PrefetchAt>
  void accumulate(float (*p)[kTileRows], uint32_t n, uint32_t d0, ValueAt value_at, PrefetchAt prefetch_at) {
    V acc[U][G][C];
    for (uint32_t u = 0; u < U; ++u)
      for (uint32_t g = 0; g < G; ++g)
        for (uint32_t c = 0; c < C; ++c) acc[u][g][c] = S::zero();
    uint32_t t = 0;
    for (; t + U <= n; t += U) {
#pragma GCC unroll 8
      for (uint32_t u = 0; u < U; ++u) {
        step<C>(acc[u], p, t + u, value_at(t + u) + d0);
        prefetch_at(t + u, d0);
      }
    }
    for (; t < n; ++t) {
      step<C>(acc[0], p, t, value_at(t) + d0);
      prefetch_at(t, d0);
    }
    for (uint32_t g = 0; g < G; ++g)
      for (uint32_t c = 0; c < C; ++c) {
        V sum = acc[0][g][c];
        for (uint32_t u = 1; u < U; ++u) sum = S::add(sum, acc[u][g][c]);
        S::store(o_[g] + d0 + c * kL, S::add(S::load(o_[g] + d0 + c * kL), sum));
      }
  }

  template <uint32_t C, class T>
  KVTIER_SIMD_INLINE static void step(V (&acc)[G][C], float (*p)[kTileRows], uint32_t t, const T* v) {
    V x[C];
#pragma GCC unroll 4
    for (uint32_t c = 0; c < C; ++c) x[c] = S::load(v + c * kL);
#pragma GCC unroll 8
    for (uint32_t g = 0; g < G; ++g) {
      const V w = S::set1(p[g][t]);
#pragma GCC unroll 4
      for (uint32_t c = 0; c < C; ++c) acc[g][c] = S::fma(w, x[c], acc[g][c]);
    }
  }

  uint32_t dim_;
  float m_[G];
  float l_[G];
  alignas(64) float o_[G][kHeadDimMax];
};

// While block i is attended, block i + kPrefetchBlocks is prefetched into L2
// line by line: as K row t of block i is scored, K row t of the later block;
// as line l of V row t is accumulated, the same line of the later block.
// Spread over the work like this, the prefetches keep memory busy through the
// whole block without stalling, as a burst would, on the few miss buffers, and
// their addresses need no state. (Slots are scattered, and the hardware
// prefetchers, which stop at page boundaries, help little.)
inline constexpr uint64_t kPrefetchBlocks = 2;

// Exact attention of one pass (G heads) over a KV head's blocks: per block,
// all G heads score its K rows (each read once), then its V rows (each read
// once) are accumulated with the weights of all G heads.
template <class S, uint32_t G, class Dot>
void attend_pass(const Dot& dot, const HostBlock* blocks, uint64_t count, uint32_t chunk_tokens, float scale,
                 float* o, float* lse) {
  const uint32_t dim = dot.dim;
  OnlineSoftmax<S, G> softmax(dim);
  alignas(64) float s[G][kTileRows];
  const uint64_t v_offset = uint64_t{chunk_tokens} * dim, row_bytes = uint64_t{dim} * sizeof(bf16);
  for (uint64_t i = 0; i < count; ++i) {
    const uint32_t n = blocks[i].tokens;
    if (n == 0) continue;
    const bf16* k = blocks[i].data;
    const bf16* v = k + v_offset;
    // Past the end of the list the prefetches go to the current block, which is harmless.
    const bf16* later = i + kPrefetchBlocks < count ? blocks[i + kPrefetchBlocks].data : k;
    auto prefetch_k = [&](uint32_t t) { prefetch_bytes<CacheLevel::kL2>(later + uint64_t{t} * dim, row_bytes); };
    auto prefetch_v = [&](uint32_t t, uint32_t d) {
      if (d * sizeof(bf16) % 64 == 0) prefetch_bytes<CacheLevel::kL2>(later + v_offset + uint64_t{t} * dim + d, 1);
    };
    dot_rows<S, G>(dot, [&](uint32_t t) { return k + uint64_t{t} * dim; }, prefetch_k, n, scale, &s[0][0], kTileRows);
    softmax.add(s, n, [&](uint32_t t) { return v + uint64_t{t} * dim; }, prefetch_v);
  }
  softmax.finish(o, lse);
}

// The far-field partial of one pass over listed blocks: pseudo-token b has
// score scale * q . kmean_b + ln(tokens_b) and value vmean_b. Blocks without
// tokens score -inf and so weigh nothing.
template <class S, uint32_t G, class Dot, class KRowAt>
void far_field_pass(const Dot& dot, KRowAt krow_at, const SummaryRows& rows, const uint32_t* blocks, uint64_t count,
                    float scale, float* o, float* lse) {
  OnlineSoftmax<S, G> softmax(dot.dim);
  alignas(64) float s[G][kTileRows];
  for (uint64_t i0 = 0; i0 < count; i0 += kTileRows) {
    const uint32_t n = static_cast<uint32_t>(count - i0 < kTileRows ? count - i0 : kTileRows);
    const uint32_t* ids = blocks + i0;
    auto prefetch_at = [&](uint32_t t) {
      if (t + kPrefetchRows < n) dot.prefetch(krow_at(ids[t + kPrefetchRows]));
    };
    dot_rows<S, G>(dot, [&](uint32_t t) { return krow_at(ids[t]); }, prefetch_at, n, scale, &s[0][0], kTileRows);
    for (uint32_t t = 0; t < n; ++t) {
      const float bias = rows.ln_tokens[rows.tokens[ids[t]]];
      for (uint32_t g = 0; g < G; ++g) s[g][t] += bias;
    }
    softmax.add(s, n, [&](uint32_t t) { return rows.vmean + ids[t] * rows.stride_f32; }, [](uint32_t, uint32_t) {});
  }
  softmax.finish(o, lse);
}

// Per-dimension mean, min and max of the first n key rows and mean of the
// value rows. Tokens are summed in order, like the scalar path, so every ISA
// builds bit-identical summaries.
template <class S>
void build_summary(const bf16* k, const bf16* v, uint32_t n, uint32_t dim, const SummaryOut& out) {
  using V = typename S::V;
  const V count = S::set1(static_cast<float>(n));
  for (uint32_t d = 0; d < dim; d += S::kLanes) {
    V ksum = S::zero(), vsum = S::zero(), lo = S::set1(INFINITY), hi = S::set1(-INFINITY);
    for (uint32_t t = 0; t < n; ++t) {
      const V x = S::load(k + uint64_t{t} * dim + d);
      ksum = S::add(ksum, x);
      lo = S::min(lo, x);
      hi = S::max(hi, x);
      vsum = S::add(vsum, S::load(v + uint64_t{t} * dim + d));
    }
    // Division, not multiplication by 1/n, so the mean is the correctly
    // rounded quotient of the sum.
    S::store(out.kmean + d, S::div(ksum, count));
    S::store(out.vmean + d, S::div(vsum, count));
    if (out.kmin != nullptr) {
      S::store(out.kmin + d, lo);
      S::store(out.kmax + d, hi);
    }
  }
}

// score_summaries of one KV head for the rules every SIMD ISA shares: fp32
// mean keys, bf16 mean keys widened, or the min/max bound. Groups larger than
// kGroupMax go in passes whose maxima combine.
template <class S>
void score_summaries(const QGroup& q, const SummaryRows& rows, float scale, ScoreRule rule, uint32_t begin,
                     uint32_t end, float* scores) {
  alignas(64) float qb[kGroupMax * kHeadDimMax];
  const uint32_t dim = q.head_dim;
  for_each_widened_pass<S>(q, [&]<uint32_t G>(Group<G>, float* qa, uint32_t g0) {
    const bool combine = g0 > 0;
    if (rule == ScoreRule::kMinMaxBound) {
      for (uint32_t g = 0; g < G; ++g)
        for (uint32_t d = g * kHeadDimMax; d < g * kHeadDimMax + dim; d += S::kLanes) {
          S::store(qb + d, S::min(S::load(qa + d), S::zero()));
          S::store(qa + d, S::max(S::load(qa + d), S::zero()));
        }
      const DotMinMax<S> dot{qa, qb, dim};
      auto row_at = [&](uint32_t b) {
        return typename DotMinMax<S>::Row{rows.kmin + b * rows.stride_f32, rows.kmax + b * rows.stride_f32};
      };
      score_rows<S, G>(dot, row_at, begin, end, scale, combine, scores);
    } else if (rows.kmean_bf16 != nullptr) {
      const DotBf16<S> dot{qa, dim};
      score_rows<S, G>(dot, [&](uint32_t b) { return rows.kmean_bf16 + b * rows.stride_bf16; }, begin, end,
                       scale, combine, scores);
    } else {
      const DotF32<S> dot{qa, dim};
      score_rows<S, G>(dot, [&](uint32_t b) { return rows.kmean + b * rows.stride_f32; }, begin, end, scale,
                       combine, scores);
    }
  });
}

// attend_blocks of one KV head with bf16 keys widened to fp32.
template <class S>
void attend_blocks(const QGroup& q, const HostBlock* blocks, uint64_t count, uint32_t chunk_tokens, float scale,
                   float* o, float* lse) {
  const uint32_t dim = q.head_dim;
  for_each_widened_pass<S>(q, [&]<uint32_t G>(Group<G>, const float* qf, uint32_t g0) {
    attend_pass<S, G>(DotBf16<S>{qf, dim}, blocks, count, chunk_tokens, scale, o + uint64_t{g0} * dim, lse + g0);
  });
}

// far_field of one KV head with fp32 or widened bf16 mean keys.
template <class S>
void far_field(const QGroup& q, const SummaryRows& rows, const uint32_t* blocks, uint64_t count, float scale,
               float* o, float* lse) {
  const uint32_t dim = q.head_dim;
  for_each_widened_pass<S>(q, [&]<uint32_t G>(Group<G>, const float* qf, uint32_t g0) {
    float* og = o + uint64_t{g0} * dim;
    if (rows.kmean_bf16 != nullptr)
      far_field_pass<S, G>(DotBf16<S>{qf, dim}, [&](uint32_t b) { return rows.kmean_bf16 + b * rows.stride_bf16; },
                           rows, blocks, count, scale, og, lse + g0);
    else
      far_field_pass<S, G>(DotF32<S>{qf, dim}, [&](uint32_t b) { return rows.kmean + b * rows.stride_f32; }, rows,
                           blocks, count, scale, og, lse + g0);
  });
}

}  // namespace simd
}  // namespace kvtier::cpu::isa

#if defined(__AVX512F__)
// GCC 12 reports the _mm512_undefined_*() placeholders inside its own
// intrinsics as uninitialised once they are inlined (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

namespace kvtier::cpu::isa {
namespace {  // one copy per AVX-512 file (avx512, avx512bf16): see the linkage rule above

// 16 fp32 lanes of a ZMM register.
struct Avx512 {
  using V = __m512;
  static constexpr uint32_t kLanes = 16;
  static constexpr uint32_t kAccRegs = 16;  // of 32 ZMM registers

  KVTIER_SIMD_INLINE static V zero() { return _mm512_setzero_ps(); }
  KVTIER_SIMD_INLINE static V set1(float x) { return _mm512_set1_ps(x); }
  KVTIER_SIMD_INLINE static V load(const float* p) { return _mm512_loadu_ps(p); }
  // A bf16 is the top half of an fp32: widening is a zero-extend and a shift.
  KVTIER_SIMD_INLINE static V load(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  KVTIER_SIMD_INLINE static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  KVTIER_SIMD_INLINE static V add(V a, V b) { return _mm512_add_ps(a, b); }
  KVTIER_SIMD_INLINE static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  KVTIER_SIMD_INLINE static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  KVTIER_SIMD_INLINE static V div(V a, V b) { return _mm512_div_ps(a, b); }
  KVTIER_SIMD_INLINE static V min(V a, V b) { return _mm512_min_ps(a, b); }
  KVTIER_SIMD_INLINE static V max(V a, V b) { return _mm512_max_ps(a, b); }
  KVTIER_SIMD_INLINE static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  KVTIER_SIMD_INLINE static float reduce_add(V x) { return _mm512_reduce_add_ps(x); }
  KVTIER_SIMD_INLINE static float reduce_max(V x) { return _mm512_reduce_max_ps(x); }

  // Lane i = sum of the lanes of u[i]: four levels of shuffle-and-add, each
  // halving the vectors, 45 instructions for 16 sums. The levels leave the
  // sum of input 4p + k in lane 4k + p, so the inputs go in transposed.
  KVTIER_SIMD_INLINE static V sum_lanes(const V* u) {
    auto in = [u](uint32_t i) { return u[(i & 3) * 4 + (i >> 2)]; };
    V a[8], b[4], c[2];
    for (uint32_t i = 0; i < 8; ++i) {  // 256-bit halves: [x_lo + x_hi, y_lo + y_hi]
      const V x = in(2 * i), y = in(2 * i + 1);
      a[i] = add(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (uint32_t i = 0; i < 4; ++i)  // 128-bit quarters
      b[i] = add(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                 _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (uint32_t i = 0; i < 2; ++i)  // pairs of floats within each quarter
      c[i] = add(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    return add(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  }

  // e^x = 2^n e^r with n = round(x log2 e) and |r| <= ln(2)/2; e^r by its
  // degree-7 Taylor polynomial (truncation r^8/8! < 2e-9, so the error is the
  // fp32 rounding of the Horner steps, a few 1e-7). ln 2 is split in two
  // (Cody-Waite) so that x - n ln 2 loses no bits. Clamping keeps 2^n normal.
  KVTIER_SIMD_INLINE static V exp(V x) {
    x = min(max(x, set1(-87.3f)), set1(88.3f));
    const V n = _mm512_roundscale_ps(mul(x, set1(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = fma(n, set1(-0.693359375f), x);
    r = fma(n, set1(2.12194440e-4f), r);
    V p = set1(1.f / 5040);
    p = fma(p, r, set1(1.f / 720));
    p = fma(p, r, set1(1.f / 120));
    p = fma(p, r, set1(1.f / 24));
    p = fma(p, r, set1(1.f / 6));
    p = fma(p, r, set1(0.5f));
    p = fma(p, r, set1(1.f));
    p = fma(p, r, set1(1.f));
    return _mm512_scalef_ps(p, n);
  }
};

}  // namespace
}  // namespace kvtier::cpu::isa
#endif  // __AVX512F__
