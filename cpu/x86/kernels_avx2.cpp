// AVX2 kernels (this file alone is compiled with -mavx2 -mfma -mf16c): the
// SIMD bodies of kernels_isa.h on 8 fp32 lanes. Only called after cpuid
// reports AVX2 and FMA.
#include <immintrin.h>

#include "kernels_isa.h"

namespace kvtier::cpu::isa {
namespace {

// 8 fp32 lanes of a YMM register.
struct Avx2 {
  using V = __m256;
  static constexpr uint32_t kLanes = 8;
  static constexpr uint32_t kAccRegs = 8;  // of 16 YMM registers

  KVTIER_SIMD_INLINE static V zero() { return _mm256_setzero_ps(); }
  KVTIER_SIMD_INLINE static V set1(float x) { return _mm256_set1_ps(x); }
  KVTIER_SIMD_INLINE static V load(const float* p) { return _mm256_loadu_ps(p); }
  // A bf16 is the top half of an fp32: widening is a zero-extend and a shift.
  KVTIER_SIMD_INLINE static V load(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  KVTIER_SIMD_INLINE static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  KVTIER_SIMD_INLINE static V add(V a, V b) { return _mm256_add_ps(a, b); }
  KVTIER_SIMD_INLINE static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  KVTIER_SIMD_INLINE static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  KVTIER_SIMD_INLINE static V div(V a, V b) { return _mm256_div_ps(a, b); }
  KVTIER_SIMD_INLINE static V min(V a, V b) { return _mm256_min_ps(a, b); }
  KVTIER_SIMD_INLINE static V max(V a, V b) { return _mm256_max_ps(a, b); }
  KVTIER_SIMD_INLINE static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

  KVTIER_SIMD_INLINE static float reduce_add(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  KVTIER_SIMD_INLINE static float reduce_max(V x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }

  // Lane i = sum of the lanes of u[i]: three levels of shuffle-and-add. The
  // levels leave the sum of input 2p + k in lane 4k + p, so the inputs go in
  // transposed.
  KVTIER_SIMD_INLINE static V sum_lanes(const V* u) {
    auto in = [u](uint32_t i) { return u[(i & 1) * 4 + (i >> 1)]; };
    V a[4], b[2];
    for (uint32_t i = 0; i < 4; ++i) {  // 128-bit halves: [x_lo + x_hi, y_lo + y_hi]
      const V x = in(2 * i), y = in(2 * i + 1);
      a[i] = add(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
    }
    for (uint32_t i = 0; i < 2; ++i)  // pairs of floats within each half
      b[i] = add(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    return add(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
  }

  // As Avx512::exp in kernels_isa.h, with 2^n built in the exponent field
  // (n in [-126, 127] after the clamp, so the result stays normal).
  KVTIER_SIMD_INLINE static V exp(V x) {
    x = min(max(x, set1(-87.3f)), set1(88.3f));
    const V n = _mm256_round_ps(mul(x, set1(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
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
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return mul(p, _mm256_castsi256_ps(e));
  }
};

}  // namespace

namespace avx2 {

void build_summary(const bf16* k, const bf16* v, uint32_t tokens, uint32_t head_dim, const SummaryOut& out) {
  simd::build_summary<Avx2>(k, v, tokens, head_dim, out);
}

void score_summaries(const QGroup& q, const SummaryRows& rows, float scale, ScoreRule rule, uint32_t begin,
                     uint32_t end, float* scores) {
  simd::score_summaries<Avx2>(q, rows, scale, rule, begin, end, scores);
}

void attend_blocks(const QGroup& q, const HostBlock* blocks, uint64_t count, uint32_t chunk_tokens, float scale,
                   float* o, float* lse) {
  simd::attend_blocks<Avx2>(q, blocks, count, chunk_tokens, scale, o, lse);
}

void far_field(const QGroup& q, const SummaryRows& rows, const uint32_t* blocks, uint64_t count, float scale,
               float* o, float* lse) {
  simd::far_field<Avx2>(q, rows, blocks, count, scale, o, lse);
}

}  // namespace avx2
}  // namespace kvtier::cpu::isa
