// Sparse paged decode attention (DESIGN.md sections 3, 10): the kernel
// template and its launcher. decode.cu holds the public entry points (argument
// checks, the split-KV plan, the merge kernel); decode_d64.cu and
// decode_d128.cu instantiate this template for the supported head dims and
// GQA groups, so that a change to one rebuilds little.
//
// Work split: one thread block (CTA) per (list, split), where a list is the
// hot set of one (sequence, KV head) and a split a run of at most
// blocks_per_split of its blocks. The CTA streams its blocks through shared
// memory in tiles of 16 KiB of K plus 16 KiB of V, kStages tiles deep with
// cp.async, and attends all G q heads of the KV head's group to each tile, so
// that every block is read from memory once. Within a tile, D/8 lanes share
// one token row (16 bytes each); each row group (those lanes) keeps its own
// online-softmax state for the G heads, and the row groups are merged through
// shared memory at the end. The split's (o, lse) goes straight to the output
// when there is one split, else to the workspace for the merge kernel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda_check.h"
#include "kvtier/core/status.h"

namespace kvtier::gpu::decode_detail {

constexpr int kThreads = 256;
// K bytes of one pipeline tile (V adds as many): 64 tokens at head dim 128.
constexpr uint32_t kTileKBytes = 16 * 1024;
// A split's slot indices are staged in shared memory; this bounds its length.
constexpr uint32_t kMaxSplitBlocks = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Device ids whose launch facts are cached (more devices are computed each time).
constexpr int kCachedDevices = 16;

template <int D, int G>
struct DecodeConfig {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static_assert(G == 1 || G == 2 || G == 4 || G == 8, "GQA group 1, 2, 4 or 8");
  // Each lane reads 16 bytes (8 bf16) of a token row.
  static constexpr int kLanesPerRow = D / 8;
  static constexpr int kRowGroups = kThreads / kLanesPerRow;
  static constexpr int kTileTokens = static_cast<int>(kTileKBytes) / (D * 2);
  static constexpr int kRowsPerThread = kTileTokens / kRowGroups;
  // With 8 heads a thread holds 64 q and 64 o floats, so one CTA per SM;
  // a fourth stage then keeps enough bytes in flight.
  static constexpr int kStages = G >= 8 ? 4 : 3;
  static constexpr int kMinCtasPerSm = G >= 8 ? 1 : 2;
  static constexpr uint32_t kStageBytes = 2 * kTileKBytes;
  static constexpr uint32_t kPipelineBytes = kStages * kStageBytes;
  // End of the CTA: m and l [row group][G], then o [row group][G][D], fp32.
  static constexpr uint32_t kMergeBytes = kRowGroups * G * (D + 2) * 4;
  static constexpr uint32_t kSmemBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
  static_assert(kRowsPerThread * kRowGroups == kTileTokens, "a tile splits evenly over the row groups");
  static_assert(32 % kLanesPerRow == 0, "a row group lies inside one warp");
};

// Kernel arguments, resolved on the host from DecodeArgs and the split plan.
struct DecodeParams {
  const uint16_t* q = nullptr;  // [lists * G][D] bf16 bits
  const std::byte* arena = nullptr;
  uint64_t slot_bytes = 0;
  uint32_t arena_slots = 0;
  uint32_t chunk_tokens = 0;  // a power of two
  uint32_t chunk_shift = 0;   // log2(chunk_tokens)
  const uint32_t* list_begin = nullptr;
  const uint32_t* slot_ids = nullptr;
  const uint32_t* last_tokens = nullptr;
  uint32_t blocks_per_split = 0;
  float scale_log2 = 0;  // softmax scale * log2(e): scores are kept in base 2
  // Split s writes o + s * o_split_stride and lse + s * lse_split_stride;
  // strides are 0 when there is one split and o, lse are the final output.
  float* o = nullptr;
  float* lse = nullptr;
  uint64_t o_split_stride = 0;
  uint64_t lse_split_stride = 0;
};

// ---- Device helpers -----------------------------------------------------------

// Lets a kernel launched after this one with programmatic stream
// serialization start its prologue now; it still waits (griddepcontrol.wait)
// for this grid's results. A no-op before sm_90.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the grid this one depends on (programmatic launch) has finished
// and its writes are visible. Returns at once without such a dependency.
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// 16 bytes global -> shared without passing through registers or L1. With
// valid == false nothing is read and the 16 bytes are zero-filled, so masked
// rows hold zeros (never a stale NaN that 0 * NaN would spread).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t src_bytes = valid ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x in one MUFU instruction (relative error ~2^-22, ex2(-inf) = +0).
// Arguments are scores minus their running max, so never large enough for
// flushed denormal results to matter next to the max's weight of 1.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Eight bf16 (one uint4) to fp32: a bf16 is the top half of a binary32.
__device__ __forceinline__ void bf16x8_to_float(const uint4 v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Starts the copy of tile `tile` of the split into `stage`: K rows at
// [0, kTileKBytes), V rows after them. Thread t copies the 16-byte pieces
// that it will itself read in attend_tile (row t / kLanesPerRow + k *
// kRowGroups, piece t % kLanesPerRow), so the pipeline needs no barrier:
// cp.async.wait_group alone makes a thread's own copies visible to it.
template <int D, int G>
__device__ __forceinline__ void issue_tile(unsigned char* stage, uint32_t tile, const DecodeParams& p,
                                           const uint32_t* slot_table, uint32_t valid_tokens) {
  using Cfg = DecodeConfig<D, G>;
  const uint32_t lane = threadIdx.x % Cfg::kLanesPerRow;
  const uint32_t row0 = threadIdx.x / Cfg::kLanesPerRow;
  const uint64_t v_offset = uint64_t{p.chunk_tokens} * D * 2;
#pragma unroll
  for (int k = 0; k < Cfg::kRowsPerThread; ++k) {
    const uint32_t row = row0 + k * Cfg::kRowGroups;
    const uint32_t token = tile * Cfg::kTileTokens + row;
    const bool valid = token < valid_tokens;
    // An invalid piece reads nothing, but cp.async still wants an address.
    const std::byte* k_src = p.arena;
    const std::byte* v_src = p.arena;
    if (valid) {
      const uint64_t slot = slot_table[token >> p.chunk_shift];
      k_src = p.arena + slot * p.slot_bytes + uint64_t{token & (p.chunk_tokens - 1)} * (D * 2) + lane * 16;
      v_src = k_src + v_offset;
    }
    unsigned char* dst = stage + (row * D + lane * 8) * 2;
    cp_async_16(dst, k_src, valid);
    cp_async_16(dst + kTileKBytes, v_src, valid);
  }
}

// Online-softmax state of one row group for the G heads: this lane's 8 dims
// of the unnormalised output, and the running max / sum (base 2), which all
// lanes of the row group hold identically.
template <int G>
struct RowGroupState {
  float o[G][8];
  float m[G];
  float l[G];
};

// Attends the G heads to the tile in `stage` (kRowsPerThread rows per row
// group), folding the rows into the state with one rescale per tile.
template <int D, int G>
__device__ __forceinline__ void attend_tile(const unsigned char* stage, uint32_t tile, uint32_t valid_tokens,
                                            const float (&q)[G][8], RowGroupState<G>& st) {
  using Cfg = DecodeConfig<D, G>;
  constexpr int R = Cfg::kRowsPerThread;
  const uint32_t lane = threadIdx.x % Cfg::kLanesPerRow;
  const uint32_t row0 = threadIdx.x / Cfg::kLanesPerRow;
  const uint16_t* ks = reinterpret_cast<const uint16_t*>(stage);
  const uint16_t* vs = reinterpret_cast<const uint16_t*>(stage + kTileKBytes);

  float s[R][G];
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const uint32_t row = row0 + k * Cfg::kRowGroups;
    float kf[8];
    bf16x8_to_float(*reinterpret_cast<const uint4*>(ks + row * D + lane * 8), kf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc = fmaf(q[g][j], kf[j], acc);
      s[k][g] = acc;
    }
  }
  // Sum the partial dots over the row group's lanes. The xor butterfly adds
  // the same two numbers on both partners, so every lane ends with the same
  // bits and the lanes' softmax states never drift apart.
#pragma unroll
  for (int offset = Cfg::kLanesPerRow / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
#pragma unroll
      for (int g = 0; g < G; ++g) s[k][g] += __shfl_xor_sync(0xffffffffu, s[k][g], offset);
    }
  }
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const bool valid = tile * Cfg::kTileTokens + row0 + k * Cfg::kRowGroups < valid_tokens;
#pragma unroll
    for (int g = 0; g < G; ++g) s[k][g] = valid ? s[k][g] : -INFINITY;
  }

  float p[R][G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float tile_max = s[0][g];
#pragma unroll
    for (int k = 1; k < R; ++k) tile_max = fmaxf(tile_max, s[k][g]);
    const float m_new = fmaxf(st.m[g], tile_max);
    // While every score so far is masked, m_new is -inf and (-inf) - (-inf)
    // would be NaN; subtracting 0 instead gives exp2(-inf) = 0 everywhere.
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    float l = st.l[g];
    // Once the running max settles, most tiles leave it unchanged and the
    // rescale (8 multiplies per head) is skipped.
    if (m_new != st.m[g]) {
      const float alpha = fast_exp2(st.m[g] - m_use);
      l *= alpha;
#pragma unroll
      for (int j = 0; j < 8; ++j) st.o[g][j] *= alpha;
      st.m[g] = m_new;
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
      p[k][g] = fast_exp2(s[k][g] - m_use);
      l += p[k][g];
    }
    st.l[g] = l;
  }
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const uint32_t row = row0 + k * Cfg::kRowGroups;
    float vf[8];
    bf16x8_to_float(*reinterpret_cast<const uint4*>(vs + row * D + lane * 8), vf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < 8; ++j) st.o[g][j] = fmaf(p[k][g], vf[j], st.o[g][j]);
    }
  }
}

// Writes the empty state (0, -inf) of the G heads.
template <int D, int G>
__device__ __forceinline__ void write_empty(float* o, float* lse) {
  for (uint32_t i = threadIdx.x; i < G * D; i += kThreads) o[i] = 0.f;
  if (threadIdx.x < G) lse[threadIdx.x] = -INFINITY;
}

// Merges the row groups' states through shared memory (which the pipeline no
// longer uses) and writes the normalised o and the natural-log lse.
template <int D, int G>
__device__ __forceinline__ void merge_row_groups(unsigned char* smem, const RowGroupState<G>& st, float* o,
                                                 float* lse) {
  using Cfg = DecodeConfig<D, G>;
  constexpr int RG = Cfg::kRowGroups;
  const uint32_t lane = threadIdx.x % Cfg::kLanesPerRow;
  const uint32_t rg = threadIdx.x / Cfg::kLanesPerRow;
  float* ms = reinterpret_cast<float*>(smem);  // [RG][G]
  float* ls = ms + RG * G;                     // [RG][G]
  float* os = ls + RG * G;                     // [RG][G][D]
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      ms[rg * G + g] = st.m[g];
      ls[rg * G + g] = st.l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float4* dst = reinterpret_cast<float4*>(os + (rg * G + g) * D + lane * 8);
    dst[0] = make_float4(st.o[g][0], st.o[g][1], st.o[g][2], st.o[g][3]);
    dst[1] = make_float4(st.o[g][4], st.o[g][5], st.o[g][6], st.o[g][7]);
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < G * D; i += kThreads) {
    const uint32_t g = i / D;
    float m = -INFINITY;
#pragma unroll 8
    for (int r = 0; r < RG; ++r) m = fmaxf(m, ms[r * G + g]);
    if (m == -INFINITY) {  // every token of the split masked: cannot happen, kept total
      o[i] = 0.f;
      if (i % D == 0) lse[g] = -INFINITY;
      continue;
    }
    float l = 0.f, acc = 0.f;
#pragma unroll 8
    for (int r = 0; r < RG; ++r) {
      // A row group that saw only masked rows has m = -inf: weight 0, o 0.
      const float w = exp2f(ms[r * G + g] - m);
      l = fmaf(w, ls[r * G + g], l);
      acc = fmaf(w, os[(r * G + g) * D + i % D], acc);
    }
    // l >= 1: the row group holding the maximum contributes exp2(0) = 1.
    o[i] = acc / l;
    if (i % D == 0) lse[g] = (m + log2f(l)) * kLn2;
  }
}

// ---- The kernel ---------------------------------------------------------------

// grid (lists, splits). Device-side contract violations (a list longer than
// the plan covers, last_tokens outside 1..chunk_tokens, a slot past the
// arena) trap, which fails the stream loudly instead of reading wild memory.
template <int D, int G>
__global__ void __launch_bounds__(kThreads, DecodeConfig<D, G>::kMinCtasPerSm)
    decode_kernel(const DecodeParams p) {
  using Cfg = DecodeConfig<D, G>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ uint32_t slot_table[kMaxSplitBlocks];

  // The merge kernel that may follow only prepares; it waits for our results.
  allow_dependent_launch();

  const uint32_t list = blockIdx.x;
  const uint32_t split = blockIdx.y;
  float* o = p.o + split * p.o_split_stride + uint64_t{list} * G * D;
  float* lse = p.lse + split * p.lse_split_stride + uint64_t{list} * G;

  const uint32_t begin = p.list_begin[list];
  const uint32_t end = p.list_begin[list + 1];
  if (end < begin || end - begin > uint64_t{gridDim.y} * p.blocks_per_split) __trap();
  const uint32_t first = split * p.blocks_per_split;
  if (first >= end - begin) {
    write_empty<D, G>(o, lse);
    return;
  }
  const uint32_t blocks = min(end - begin - first, p.blocks_per_split);
  uint32_t valid_tokens = blocks << p.chunk_shift;
  if (first + blocks == end - begin) {  // this split holds the list's tail block
    const uint32_t last = p.last_tokens[list];
    if (last == 0 || last > p.chunk_tokens) __trap();
    valid_tokens -= p.chunk_tokens - last;
  }
  for (uint32_t i = threadIdx.x; i < blocks; i += kThreads) {
    const uint32_t slot = p.slot_ids[begin + first + i];
    if (slot >= p.arena_slots) __trap();
    slot_table[i] = slot;
  }
  __syncthreads();

  const uint32_t tiles = (valid_tokens + Cfg::kTileTokens - 1) / Cfg::kTileTokens;
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (static_cast<uint32_t>(s) < tiles) issue_tile<D, G>(smem + s * Cfg::kStageBytes, s, p, slot_table, valid_tokens);
    cp_async_commit();  // empty groups too, so that wait_group counts tiles
  }

  // This lane's 8 dims of each q head of the group, pre-scaled into base 2.
  float q[G][8];
  const uint32_t lane = threadIdx.x % Cfg::kLanesPerRow;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p.q + (uint64_t{list} * G + g) * D + lane * 8));
    bf16x8_to_float(raw, q[g]);
#pragma unroll
    for (int j = 0; j < 8; ++j) q[g][j] *= p.scale_log2;
  }
  RowGroupState<G> st;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    st.m[g] = -INFINITY;
    st.l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) st.o[g][j] = 0.f;
  }

  for (uint32_t t = 0; t < tiles; ++t) {
    // Refill the stage read in iteration t - 1 (this thread's own pieces
    // only, already consumed), keeping kStages - 1 tiles in flight.
    const uint32_t ahead = t + Cfg::kStages - 1;
    if (ahead < tiles)
      issue_tile<D, G>(smem + (ahead % Cfg::kStages) * Cfg::kStageBytes, ahead, p, slot_table, valid_tokens);
    cp_async_commit();
    cp_async_wait<Cfg::kStages - 1>();  // tile t has landed
    attend_tile<D, G>(smem + (t % Cfg::kStages) * Cfg::kStageBytes, t, valid_tokens, q, st);
  }
  cp_async_wait<0>();
  __syncthreads();  // every thread is done with the stages before they are reused
  merge_row_groups<D, G>(smem, st, o, lse);
}

// ---- Host side ------------------------------------------------------------------

// CTAs of decode_kernel<D, G> resident per SM on `device`, after allowing its
// dynamic shared memory (cached per device; the attribute is per device).
template <int D, int G>
Result<int> decode_ctas_per_sm(int device) {
  using Cfg = DecodeConfig<D, G>;
  static std::array<std::atomic<int>, kCachedDevices> cache{};
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  // Workstation GPUs (sm_86/89/120) let a block opt into 99 KiB, Hopper 227 KiB.
  int optin_bytes = 0;
  KVT_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (Cfg::kSmemBytes + sizeof(uint32_t) * kMaxSplitBlocks > static_cast<uint32_t>(optin_bytes))
    return unavailable("decode_attention: head_dim " + std::to_string(D) + " with GQA group " + std::to_string(G) +
                       " needs " + std::to_string(Cfg::kSmemBytes) + " bytes of shared memory per block; this GPU "
                       "allows " + std::to_string(optin_bytes) + " (cudaDevAttrMaxSharedMemoryPerBlockOptin). Groups "
                       "up to 4 fit every supported GPU; a 3-stage group-8 variant is not built yet");
  KVT_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(decode_kernel<D, G>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(Cfg::kSmemBytes)));
  int ctas = 0;
  KVT_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, decode_kernel<D, G>, kThreads, Cfg::kSmemBytes));
  if (ctas < 1)
    return internal_error("decode_kernel<" + std::to_string(D) + ", " + std::to_string(G) + "> does not fit an SM (" +
                          std::to_string(Cfg::kSmemBytes) + " bytes of shared memory)");
  if (cacheable) cache[device].store(ctas, std::memory_order_relaxed);
  return ctas;
}

// Launches decode_kernel<D, G> on grid (lists, splits). decode_ctas_per_sm
// must have succeeded on this device first (it allows the shared memory).
template <int D, int G>
Status launch_decode_kernel(const DecodeParams& params, uint32_t lists, uint32_t splits, cudaStream_t stream) {
  using Cfg = DecodeConfig<D, G>;
  decode_kernel<D, G><<<dim3(lists, splits), kThreads, Cfg::kSmemBytes, stream>>>(params);
  KVT_CUDA_RETURN_IF_LAUNCH_FAILED("decode_kernel<" + std::to_string(D) + ", " + std::to_string(G) + ">");
  return Status::ok_status();
}

// The supported (head dim, group) pairs, for instantiation and dispatch.
#define KVT_DECODE_CONFIGS(X) \
  X(64, 1) X(64, 2) X(64, 4) X(64, 8) X(128, 1) X(128, 2) X(128, 4) X(128, 8)

#define KVT_DECODE_INSTANTIATE(D, G)                  \
  template Result<int> decode_ctas_per_sm<D, G>(int); \
  template Status launch_decode_kernel<D, G>(const DecodeParams&, uint32_t, uint32_t, cudaStream_t);

#define KVT_DECODE_EXTERN(D, G)                              \
  extern template Result<int> decode_ctas_per_sm<D, G>(int); \
  extern template Status launch_decode_kernel<D, G>(const DecodeParams&, uint32_t, uint32_t, cudaStream_t);

}  // namespace kvtier::gpu::decode_detail
