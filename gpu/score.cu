// Summary scoring on the GPU (kernels.h, ScoreArgs): the decode step's
// selection reads every far block's mean key, which at 1M tokens is 32 MiB per
// layer -- a third of a millisecond of host memory bandwidth, a few
// microseconds of HBM. One thread per (KV head, block): it reads the block's
// row in 16-byte vectors and dots it with the group's q heads, which the CTA
// keeps in shared memory as fp32 (every thread reads the same q element at
// once, a broadcast).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "arena_check.h"
#include "cuda_check.h"
#include "kvtier/gpu/kernels.h"

namespace kvtier::gpu {
namespace {

constexpr int kScoreThreads = 256;
constexpr uint32_t kMaxScoreHeadDim = 256;

struct ScoreParams {
  const __nv_bfloat16* q;
  const void* kmean;
  uint64_t row_stride, head_rows, scores_stride;
  uint32_t head_dim, block_begin, block_end;
  float scale;
  float* scores;
};

// Eight consecutive elements of a row as fp32.
template <bool kF32>
__device__ __forceinline__ void load8(const void* base, uint64_t element, float (&k)[8]) {
  if constexpr (kF32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + element);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    k[0] = a.x, k[1] = a.y, k[2] = a.z, k[3] = a.w, k[4] = b.x, k[5] = b.y, k[6] = b.z, k[7] = b.w;
  } else {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(base) + element));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      k[2 * i] = __uint_as_float(w[i] << 16);
      k[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

// grid (block ranges of kScoreThreads, kv_heads); dynamic shared memory G * head_dim floats.
template <int G, bool kF32>
__global__ void __launch_bounds__(kScoreThreads) score_kernel(const ScoreParams p) {
  extern __shared__ float qs[];  // [G][head_dim]
  const uint32_t h = blockIdx.y, D = p.head_dim;
  const __nv_bfloat16* q = p.q + uint64_t{h} * G * D;
  for (uint32_t i = threadIdx.x; i < G * D; i += kScoreThreads) qs[i] = __bfloat162float(q[i]);
  __syncthreads();
  const uint64_t b = uint64_t{p.block_begin} + uint64_t{blockIdx.x} * kScoreThreads + threadIdx.x;
  if (b >= p.block_end) return;
  const uint64_t row = (uint64_t{h} * p.head_rows + b) * p.row_stride;
  float acc[G];
#pragma unroll
  for (int g = 0; g < G; ++g) acc[g] = 0.f;
  for (uint32_t d0 = 0; d0 < D; d0 += 8) {
    float k[8];
    load8<kF32>(p.kmean, row + d0, k);
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g] = fmaf(qs[g * D + d0 + j], k[j], acc[g]);
  }
  float best = p.scale * acc[0];
#pragma unroll
  for (int g = 1; g < G; ++g) best = fmaxf(best, p.scale * acc[g]);
  p.scores[uint64_t{h} * p.scores_stride + b] = best;
}

template <int G>
void launch_score(const ScoreParams& p, uint32_t kv_heads, bool f32, cudaStream_t stream) {
  const uint32_t n = p.block_end - p.block_begin;
  const dim3 grid((n + kScoreThreads - 1) / kScoreThreads, kv_heads);
  const size_t smem = size_t{G} * p.head_dim * sizeof(float);
  if (f32)
    score_kernel<G, true><<<grid, kScoreThreads, smem, stream>>>(p);
  else
    score_kernel<G, false><<<grid, kScoreThreads, smem, stream>>>(p);
}

Status check_score_args(const ScoreArgs& a) {
  constexpr const char* kWhat = "score_summaries";
  KVT_RETURN_IF_ERROR(require_pointers(kWhat, {{"q", a.q}, {"kmean", a.kmean}, {"scores", a.scores}}));
  KVT_RETURN_IF_ERROR(check_gqa_heads(kWhat, a.q_heads, a.kv_heads));
  if (a.kv_heads > 65535) return invalid_field(kWhat, "kv_heads", a.kv_heads, "exceeds 65535 (one grid row per KV head)");
  if (a.head_dim == 0 || a.head_dim % 8 != 0 || a.head_dim > kMaxScoreHeadDim)
    return invalid_field(kWhat, "head_dim", a.head_dim, "must be a multiple of 8 in 8..256");
  if (a.row_stride < a.head_dim || a.row_stride % (a.kmean_f32 ? 4 : 8) != 0)
    return invalid_field(kWhat, "row_stride", a.row_stride,
                         "must be at least head_dim and keep rows 16-byte aligned (a multiple of " +
                             std::string(a.kmean_f32 ? "4" : "8") + " elements)");
  if (reinterpret_cast<uintptr_t>(a.kmean) % 16 != 0)
    return invalid_argument("score_summaries: kmean is not 16-byte aligned; allocate it with cudaMalloc");
  if (a.block_begin > a.block_end)
    return invalid_field(kWhat, "block_begin", a.block_begin, "is past block_end=" + std::to_string(a.block_end));
  if (a.head_rows < a.block_end)
    return invalid_field(kWhat, "head_rows", a.head_rows, "is below block_end=" + std::to_string(a.block_end));
  if (a.scores_stride < a.block_end)
    return invalid_field(kWhat, "scores_stride", a.scores_stride, "is below block_end=" + std::to_string(a.block_end));
  return Status::ok_status();
}

}  // namespace

Status score_summaries(const ScoreArgs& args, cudaStream_t stream) {
  KVT_RETURN_IF_ERROR(check_score_args(args));
  if (args.block_begin == args.block_end) return Status::ok_status();
  ScoreParams p;
  p.q = reinterpret_cast<const __nv_bfloat16*>(args.q);
  p.kmean = args.kmean;
  p.row_stride = args.row_stride;
  p.head_rows = args.head_rows;
  p.scores_stride = args.scores_stride;
  p.head_dim = args.head_dim;
  p.block_begin = args.block_begin;
  p.block_end = args.block_end;
  p.scale = args.scale;
  p.scores = args.scores;
  switch (args.q_heads / args.kv_heads) {
    case 1: launch_score<1>(p, args.kv_heads, args.kmean_f32, stream); break;
    case 2: launch_score<2>(p, args.kv_heads, args.kmean_f32, stream); break;
    case 4: launch_score<4>(p, args.kv_heads, args.kmean_f32, stream); break;
    default: launch_score<8>(p, args.kv_heads, args.kmean_f32, stream); break;
  }
  KVT_CUDA_RETURN_IF_LAUNCH_FAILED("score_summaries");
  return Status::ok_status();
}

}  // namespace kvtier::gpu
