// AVX-512 kernels with AVX512_BF16 dot products (this file alone is compiled
// with -mavx512bf16 on top of the AVX-512 flags). _mm512_dpbf16_ps multiplies
// 32 bf16 pairs and adds them into 16 fp32 lanes, so q . k of bf16 keys needs
// no widening. The product of two bf16 values (8-bit significands) is exact in
// fp32, so this path is as accurate as widening and fp32 FMAs: only the sums
// round (and subnormal inputs are read as zero). Where bf16 instructions do
// not help -- fp32 mean keys, the min/max bound, building summaries -- it calls
// the plain AVX-512 kernels.
#include "kernels_isa.h"

namespace kvtier::cpu::isa {
namespace {

// bf16 rows against the pass's bf16 q rows, 32 elements per instruction.
// Both are read as they are stored: pairs of adjacent elements.
struct DotPairs {
  using Row = const bf16*;
  static constexpr uint32_t kStep = 32;
  const bf16* q;  // [G][dim]
  uint32_t dim;
  KVTIER_SIMD_INLINE __m512bh load(Row r, uint32_t i) const { return (__m512bh)_mm512_loadu_si512(r + i); }
  KVTIER_SIMD_INLINE __m512 madd(__m512 acc, __m512bh k, uint32_t g, uint32_t i) const {
    return _mm512_dpbf16_ps(acc, k, (__m512bh)_mm512_loadu_si512(q + g * dim + i));
  }
  KVTIER_SIMD_INLINE void prefetch(Row r) const {
    simd::prefetch_bytes<simd::CacheLevel::kL1>(r, uint64_t{dim} * sizeof(bf16));
  }
};

// Calls f(Group<G>, DotPairs, g0) for each pass of at most kGroupMax heads.
template <class F>
void for_each_pass(const QGroup& q, F&& f) {
  for (uint32_t g0 = 0; g0 < q.heads; g0 += kGroupMax) {
    const uint32_t heads = simd::min_u32(kGroupMax, q.heads - g0);
    const DotPairs dot{q.q + uint64_t{g0} * q.head_dim, q.head_dim};
    simd::with_group(heads, [&]<uint32_t G>(simd::Group<G> group) { f(group, dot, g0); });
  }
}

}  // namespace

namespace avx512bf16 {

void build_summary(const bf16* k, const bf16* v, uint32_t tokens, uint32_t head_dim, const SummaryOut& out) {
  avx512::build_summary(k, v, tokens, head_dim, out);
}

void score_summaries(const QGroup& q, const SummaryRows& rows, float scale, ScoreRule rule, uint32_t begin,
                     uint32_t end, float* scores) {
  if (rule != ScoreRule::kMaxDot || rows.kmean_bf16 == nullptr || q.head_dim % DotPairs::kStep != 0)
    return avx512::score_summaries(q, rows, scale, rule, begin, end, scores);
  for_each_pass(q, [&]<uint32_t G>(simd::Group<G>, const DotPairs& dot, uint32_t g0) {
    auto row_at = [&](uint32_t b) { return rows.kmean_bf16 + b * rows.stride_bf16; };
    simd::score_rows<Avx512, G>(dot, row_at, begin, end, scale, g0 > 0, scores);
  });
}

void attend_blocks(const QGroup& q, const HostBlock* blocks, uint64_t count, uint32_t chunk_tokens, float scale,
                   float* o, float* lse) {
  if (q.head_dim % DotPairs::kStep != 0) return avx512::attend_blocks(q, blocks, count, chunk_tokens, scale, o, lse);
  for_each_pass(q, [&]<uint32_t G>(simd::Group<G>, const DotPairs& dot, uint32_t g0) {
    simd::attend_pass<Avx512, G>(dot, blocks, count, chunk_tokens, scale, o + uint64_t{g0} * q.head_dim, lse + g0);
  });
}

void far_field(const QGroup& q, const SummaryRows& rows, const uint32_t* blocks, uint64_t count, float scale,
               float* o, float* lse) {
  if (rows.kmean_bf16 == nullptr || q.head_dim % DotPairs::kStep != 0)
    return avx512::far_field(q, rows, blocks, count, scale, o, lse);
  for_each_pass(q, [&]<uint32_t G>(simd::Group<G>, const DotPairs& dot, uint32_t g0) {
    auto krow_at = [&](uint32_t b) { return rows.kmean_bf16 + b * rows.stride_bf16; };
    simd::far_field_pass<Avx512, G>(dot, krow_at, rows, blocks, count, scale, o + uint64_t{g0} * q.head_dim,
                                    lse + g0);
  });
}

}  // namespace avx512bf16
}  // namespace kvtier::cpu::isa
