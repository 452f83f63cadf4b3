// Kernel templates of kv_write.cu: appending K/V rows into arena slots and
// building block summaries (DESIGN.md sections 2, 3, 10). Private to gpu/.
//
// Indices that live in device memory (slot ids, rows, token counts) cannot be
// checked by the host launcher; an out-of-range one is a caller's bug, and
// the kernels trap on it (the device's always-on assert) rather than write
// outside a slot or leave silently wrong data.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvtier::gpu::kv_write {

constexpr int kThreads = 128;

// The arena as the kernels see it: only what addressing a row needs.
struct Arena {
  unsigned char* base;
  uint64_t slot_bytes;
  uint32_t slots;
  uint32_t chunk_tokens;
};

// ---- Device helpers --------------------------------------------------------

__device__ __forceinline__ void check_index(bool ok) {
  if (!ok) __trap();
}

// Byte address of K row `row` of slot `slot`; V row r is chunk_tokens rows on.
__device__ __forceinline__ unsigned char* row_address(const Arena& a, uint32_t slot, uint32_t row,
                                                      uint32_t row_bytes) {
  check_index(slot < a.slots && row < a.chunk_tokens);
  return a.base + uint64_t{slot} * a.slot_bytes + uint64_t{row} * row_bytes;
}

// Copies element `e` (a Vec) of one K or V row. kv is 0 for K, 1 for V.
template <class Vec>
__device__ __forceinline__ void copy_row_element(const Arena& a, const Vec* src_row, uint32_t slot, uint32_t row,
                                                 uint32_t kv, uint32_t row_bytes, uint32_t e) {
  unsigned char* k_row = row_address(a, slot, row, row_bytes);
  Vec* dst = reinterpret_cast<Vec*>(k_row + uint64_t{kv} * a.chunk_tokens * row_bytes);
  dst[e] = src_row[e];
}

// ---- Append kernels ----------------------------------------------------------
//
// One thread per Vec of one K or V row: index = ((item * 2) + kv) * vecs + e,
// where item = (b, h) for the decode form and (t, h) for the prefill form.
// Vec is uint4 (16-byte copies) when every row address is 16-byte aligned,
// else the 2-byte element type.

template <class Vec>
__global__ void __launch_bounds__(kThreads)
    append_decode_kernel(const Vec* __restrict__ k, const Vec* __restrict__ v, uint32_t batch, uint32_t kv_heads,
                         Arena arena, uint32_t row_bytes, const uint32_t* __restrict__ slots,
                         const uint32_t* __restrict__ rows) {
  const uint32_t vecs = row_bytes / sizeof(Vec);
  // 32-bit indices (the launcher checks that the total fits): 64-bit
  // division would cost more than the copy itself in this launch-bound kernel.
  const uint32_t total = batch * kv_heads * 2 * vecs;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const uint32_t e = i % vecs;
    const uint32_t row_index = i / vecs;  // (item, kv)
    const uint32_t kv = row_index & 1;
    const uint32_t item = row_index >> 1;  // b * kv_heads + h
    const uint32_t b = item / kv_heads;
    const Vec* src = (kv == 0 ? k : v) + uint64_t{item} * vecs;
    copy_row_element(arena, src, slots[item], rows[b], kv, row_bytes, e);
  }
}

template <class Vec>
__global__ void __launch_bounds__(kThreads)
    append_range_kernel(const Vec* __restrict__ k, const Vec* __restrict__ v, uint32_t tokens, uint32_t kv_heads,
                        uint64_t first_token, uint32_t chunks, Arena arena, uint32_t row_bytes,
                        const uint32_t* __restrict__ slots) {
  const uint32_t vecs = row_bytes / sizeof(Vec);
  const uint32_t total = tokens * kv_heads * 2 * vecs;
  // Positions relative to the first chunk's start keep the per-token math in
  // 32 bits: (first_token % chunk) + t < chunk + tokens.
  const uint32_t first_row = static_cast<uint32_t>(first_token % arena.chunk_tokens);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const uint32_t e = i % vecs;
    const uint32_t row_index = i / vecs;
    const uint32_t kv = row_index & 1;
    const uint32_t item = row_index >> 1;  // t * kv_heads + h, the source row
    const uint32_t t = item / kv_heads;
    const uint32_t h = item - t * kv_heads;
    const uint32_t rel = first_row + t;  // position from the start of chunk c0
    const uint32_t chunk = rel / arena.chunk_tokens;
    const uint32_t row = rel - chunk * arena.chunk_tokens;
    const Vec* src = (kv == 0 ? k : v) + uint64_t{item} * vecs;
    copy_row_element(arena, src, slots[uint64_t{h} * chunks + chunk], row, kv, row_bytes, e);
  }
}

// ---- Summary kernel -----------------------------------------------------------
//
// One group of kLanes = kHeadDim / 8 threads per block summary, each thread
// owning 8 consecutive dims read as one 16-byte vector per token; a CTA of
// kThreads serves kThreads / kLanes blocks. Sums are fp32 in token order and
// the mean is the correctly rounded quotient sum / n, exactly as the CPU
// scorer's build_summary computes it, so both backends give the same bits.

struct SummaryOutputs {
  float* kmean;
  __nv_bfloat16* kmean_bf16;
  float* kmin;
  float* kmax;
  float* vmean;
  uint32_t f32_stride;
  uint32_t bf16_stride;
};

constexpr int kDimsPerLane = 8;

__device__ __forceinline__ void widen(const uint4& raw, float (&x)[kDimsPerLane]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // bf16 -> fp32 is exact: the bf16 bits are the top half of the float.
    x[2 * j] = __uint_as_float(words[j] << 16);
    x[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
  }
}

// Sum (and min/max when wanted) of one lane's 8 dims over rows [0, n) of a
// K or V matrix with `stride` uint4 per row.
template <bool kMinMax>
__device__ __forceinline__ void accumulate(const uint4* __restrict__ rows, uint32_t stride, uint32_t n,
                                           float (&sum)[kDimsPerLane], float (&lo)[kDimsPerLane],
                                           float (&hi)[kDimsPerLane]) {
#pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) {
    sum[j] = 0.f;
    lo[j] = __int_as_float(0x7f800000);   // +inf
    hi[j] = __int_as_float(0xff800000);   // -inf
  }
  // Unrolled so that several 16-byte loads are in flight before the adds,
  // which stay in token order.
#pragma unroll 8
  for (uint32_t t = 0; t < n; ++t) {
    float x[kDimsPerLane];
    widen(__ldg(rows + uint64_t{t} * stride), x);
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) {
      sum[j] = __fadd_rn(sum[j], x[j]);
      if constexpr (kMinMax) {
        lo[j] = fminf(lo[j], x[j]);
        hi[j] = fmaxf(hi[j], x[j]);
      }
    }
  }
}

__device__ __forceinline__ void store_row(float* row, const float (&x)[kDimsPerLane]) {
#pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) row[j] = x[j];
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    summary_kernel(Arena arena, const uint32_t* __restrict__ slots, const uint32_t* __restrict__ tokens,
                   uint32_t count, SummaryOutputs out) {
  constexpr int kLanes = kHeadDim / kDimsPerLane;
  constexpr int kBlocksPerCta = kThreads / kLanes;
  const uint32_t i = blockIdx.x * kBlocksPerCta + threadIdx.x / kLanes;
  if (i >= count) return;
  const uint32_t lane = threadIdx.x % kLanes;
  const uint32_t d0 = lane * kDimsPerLane;
  const uint32_t slot = slots[i];
  const uint32_t n = tokens[i];
  check_index(slot < arena.slots && n <= arena.chunk_tokens);

  const auto* k = reinterpret_cast<const uint4*>(arena.base + uint64_t{slot} * arena.slot_bytes) + lane;
  const uint4* v = k + uint64_t{arena.chunk_tokens} * kLanes;
  // A block with no tokens gets a zero summary, as on the CPU: 0/0 would be
  // NaN and an empty min/max would be +-inf.
  const float count_f = static_cast<float>(n);
  float sum[kDimsPerLane], lo[kDimsPerLane], hi[kDimsPerLane];
  const uint64_t row = i;

  const bool want_k =
      out.kmean != nullptr || out.kmean_bf16 != nullptr || out.kmin != nullptr || out.kmax != nullptr;
  if (want_k) {
    const bool min_max = out.kmin != nullptr || out.kmax != nullptr;
    if (min_max) {
      accumulate<true>(k, kLanes, n, sum, lo, hi);
    } else {
      accumulate<false>(k, kLanes, n, sum, lo, hi);
    }
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) {
      sum[j] = n == 0 ? 0.f : __fdiv_rn(sum[j], count_f);
      lo[j] = n == 0 ? 0.f : lo[j];
      hi[j] = n == 0 ? 0.f : hi[j];
    }
    if (out.kmean != nullptr) store_row(out.kmean + row * out.f32_stride + d0, sum);
    if (out.kmin != nullptr) store_row(out.kmin + row * out.f32_stride + d0, lo);
    if (out.kmax != nullptr) store_row(out.kmax + row * out.f32_stride + d0, hi);
    if (out.kmean_bf16 != nullptr) {
      __nv_bfloat16* dst = out.kmean_bf16 + row * out.bf16_stride + d0;
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j) dst[j] = __float2bfloat16_rn(sum[j]);
    }
  }
  if (out.vmean != nullptr) {
    accumulate<false>(v, kLanes, n, sum, lo, hi);
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) sum[j] = n == 0 ? 0.f : __fdiv_rn(sum[j], count_f);
    store_row(out.vmean + row * out.f32_stride + d0, sum);
  }
}

}  // namespace kvtier::gpu::kv_write
