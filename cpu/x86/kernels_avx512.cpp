// AVX-512 kernels (this file alone is compiled with -mavx512f/bw/vl/dq): the
// SIMD bodies of kernels_isa.h on 16 fp32 lanes. Only called after cpuid
// reports AVX-512F, BW and VL.
#include "kernels_isa.h"

namespace kvtier::cpu::isa::avx512 {

void build_summary(const bf16* k, const bf16* v, uint32_t tokens, uint32_t head_dim, const SummaryOut& out) {
  simd::build_summary<Avx512>(k, v, tokens, head_dim, out);
}

void score_summaries(const QGroup& q, const SummaryRows& rows, float scale, ScoreRule rule, uint32_t begin,
                     uint32_t end, float* scores) {
  simd::score_summaries<Avx512>(q, rows, scale, rule, begin, end, scores);
}

void attend_blocks(const QGroup& q, const HostBlock* blocks, uint64_t count, uint32_t chunk_tokens, float scale,
                   float* o, float* lse) {
  simd::attend_blocks<Avx512>(q, blocks, count, chunk_tokens, scale, o, lse);
}

void far_field(const QGroup& q, const SummaryRows& rows, const uint32_t* blocks, uint64_t count, float scale,
               float* o, float* lse) {
  simd::far_field<Avx512>(q, rows, blocks, count, scale, o, lse);
}

}  // namespace kvtier::cpu::isa::avx512
