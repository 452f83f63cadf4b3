// Sparse paged decode attention (DESIGN.md sections 3, 10): the kernel
// template and its launcher. decode.cu holds the public entry points (argument
// checks, the split-KV plan, the merge kernel); decode_d64.cu and
// decode_d128.cu instantiate this template for the supported head dims and
// GQA groups, so that a change to one rebuilds little.
//
// Work split: one thread block (CTA) per (list, split), where a list is the
// hot set of one (sequence, KV head) and a split a run of at most
// blocks_per_split of its blocks. The CTA streams its tokens through shared
// memory in tiles of 64 tokens (K then V), kStages tiles deep with cp.async,
// and attends all G q heads of the KV head's group to each tile, so that
// every block is read from memory once.
//
// The arithmetic runs on tensor cores (mma.sync, sm_80+). Each of the 8
// warps owns 8 token rows of every tile: it copies them itself (so it needs
// no CTA barrier, only __syncwarp) and keeps its own online-softmax state.
// The G q heads are the rows of the 16-row mma tiles (rows G..15 are zero):
//   scores  S[16 x 8 tokens] = Q[16 x D] . K^T          (m16n8k16, fp32 acc)
//   output  O[16 x D]       += P[16 x 8 tokens] . V     (m16n8k8, fp32 acc)
// S's accumulator layout is the A-operand layout of the second product, so P
// never leaves registers. P is in [0, 256] (see kLazyRescale) and goes to the
// tensor core as two bf16 terms, hi = bf16(P) and lo = bf16(P - hi), so it
// carries ~16 significant bits instead of bf16's 8: the result stays within
// a few 1e-6 of fp32 arithmetic, at the cost of a second PV product, which is
// cheap next to the bytes read. Q and K are bf16 already, so S is exact up to
// fp32 accumulation.
//
// The warps' states are merged through shared memory at the end. With
// several splits per list, each split writes its (o, lse) to the workspace
// and the merge kernel in decode.cu combines them. (Merging in the decode
// kernel instead, by thread block clusters or by the split that finishes
// last, measured slower on the H200: bench/results/2026-11-28-gpu-h200-tc.json.
// So did persistent CTAs taking runs of tiles from a counter at run time, to
// even out the SMs' differing bandwidth: 2026-11-29-gpu-h200-dynamic-balance.json.)
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
constexpr int kWarps = kThreads / 32;
// Tokens of one pipeline tile: 8 rows per warp.
constexpr int kTileTokens = 64;
constexpr int kWarpRows = kTileTokens / kWarps;
// A split's slot indices are staged in shared memory; this bounds its length.
constexpr uint32_t kMaxSplitBlocks = 256;
// A warp keeps a running maximum that may trail the true one by up to this
// much (base 2) and rescales only when a score exceeds it by more: P <= 2^8,
// and most tiles skip the 2 * D / 8 multiplies of a rescale.
constexpr float kLazyRescale = 8.f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Device ids whose launch facts are cached (more devices are computed each time).
constexpr int kCachedDevices = 16;
#ifndef KVT_DECODE_STAGES_D128
#define KVT_DECODE_STAGES_D128 3
#endif
#ifndef KVT_DECODE_STAGES_D64
#define KVT_DECODE_STAGES_D64 5
#endif
// A probe may define this to record when each CTA reaches marks 0 (start),
// 1 (main loop done), 3 (warp states exchanged) and 2 (end); it expands to
// nothing in the library (bench/probes/decode_timeline.cu).
#ifndef KVT_DECODE_PROBE_MARK
#define KVT_DECODE_PROBE_MARK(mark)
#endif

template <int D, int G>
struct DecodeConfig {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static_assert(G == 1 || G == 2 || G == 4 || G == 8, "GQA group 1, 2, 4 or 8");
  // 16-byte pieces (8 bf16) of one token row.
  static constexpr int kPieces = D / 8;
  static constexpr uint32_t kTileKBytes = kTileTokens * D * 2;
  static constexpr uint32_t kStageBytes = 2 * kTileKBytes;
  // 64 KiB of K and V in flight per CTA at either head dim, two CTAs per SM.
  // (A probe may override the depths to sweep them: bench/probes.)
  static constexpr int kStages = D == 128 ? KVT_DECODE_STAGES_D128 : KVT_DECODE_STAGES_D64;
  static constexpr int kMinCtasPerSm = 2;
  static constexpr uint32_t kPipelineBytes = kStages * kStageBytes;
  // End of the CTA: the warps' m and l [warp][G] and o [warp][G][D], fp32.
  static constexpr uint32_t kMergeBytes = kWarps * G * (D + 2) * 4;
  static constexpr uint32_t kSmemBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
  static_assert(kPieces * kWarpRows % 32 == 0, "a warp's rows split evenly over its lanes");
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
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* gmem_src, bool valid) {
  const uint32_t src_bytes = valid ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x in one MUFU instruction (relative error ~2^-22, ex2(-inf) = +0).
// Arguments are scores minus a running max, so never large enough for
// flushed denormal results to matter next to the max's weight of >= 1.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the address of row
// l % 8 of matrix l / 8 and receives, per matrix, row l / 4 elements
// 2 (l % 4) and 2 (l % 4) + 1 (transposed: those rows, column l / 4).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t smem_addr, uint32_t (&r)[4]) {
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

// c[0..1] += rows 0..7 of A[16 x 16] . B[16 x 8], where A's rows 8..15 are
// zero: a0 holds row lane / 4, k 2 (lane % 4) + {0, 1}; a2 the same row, k + 8.
// The zero rows' results are discarded, so they need no registers of ours.
__device__ __forceinline__ void mma_16816_top(float (&c)[2], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  [[maybe_unused]] float d2, d3;  // rows 8..15, zero and discarded
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %12};\n"
      : "=f"(c[0]), "=f"(c[1]), "=f"(d2), "=f"(d3)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(0.f));
}

// c[0..1] += rows 0..7 of A[16 x 8] . B[8 x 8], A's rows 8..15 zero.
__device__ __forceinline__ void mma_1688_top(float (&c)[2], uint32_t a0, uint32_t b0) {
  [[maybe_unused]] float d2, d3;  // rows 8..15, zero and discarded
  asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %9};\n"
      : "=f"(c[0]), "=f"(c[1]), "=f"(d2), "=f"(d3)
      : "r"(a0), "r"(0u), "r"(b0), "f"(c[0]), "f"(c[1]), "f"(0.f));
}

// Two floats as bf16x2 (round to nearest even), x in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float x, float y) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(y), "f"(x));
  return r;
}

__device__ __forceinline__ float bf16_lo_to_float(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi_to_float(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// Shared-memory byte offset of 16-byte piece `piece` of row `row` in a
// [rows][D] bf16 tile. Pieces are XOR-swizzled by the row's low three bits,
// so the 8 rows an ldmatrix reads at one piece index hit 8 different bank
// groups instead of one.
template <int D>
__device__ __forceinline__ uint32_t tile_offset(uint32_t row, uint32_t piece) {
  return row * (D * 2) + ((piece ^ (row & 7)) * 16);
}

// Starts the copy of this warp's 8 rows of tile `tile` of the split into
// `stage` (a shared-memory address): K rows, then V rows kTileKBytes later.
// Consecutive lanes copy consecutive 16-byte pieces of a row.
template <int D, int G>
__device__ __forceinline__ void issue_tile(uint32_t stage, uint32_t tile, const DecodeParams& p,
                                           const uint32_t* slot_table, uint32_t valid_tokens, uint32_t warp,
                                           uint32_t lane) {
  using Cfg = DecodeConfig<D, G>;
  const uint64_t v_offset = uint64_t{p.chunk_tokens} * D * 2;
#pragma unroll
  for (int k = 0; k < Cfg::kPieces * kWarpRows / 32; ++k) {
    const uint32_t index = lane + 32 * k;
    const uint32_t row = warp * kWarpRows + index / Cfg::kPieces, piece = index % Cfg::kPieces;
    const uint32_t token = tile * kTileTokens + row;
    const bool valid = token < valid_tokens;
    // An invalid piece reads nothing, but cp.async still wants an address.
    const std::byte* k_src = p.arena;
    const std::byte* v_src = p.arena;
    if (valid) {
      const uint64_t slot = slot_table[token >> p.chunk_shift];
      k_src = p.arena + slot * p.slot_bytes + uint64_t{token & (p.chunk_tokens - 1)} * (D * 2) + piece * 16;
      v_src = k_src + v_offset;
    }
    const uint32_t dst = stage + tile_offset<D>(row, piece);
    cp_async_16(dst, k_src, valid);
    cp_async_16(dst + Cfg::kTileKBytes, v_src, valid);
  }
}

// Online-softmax state of one warp for the row (q head) lane / 4: the
// unnormalised output at dims 8 n + 2 (lane % 4) + {0, 1} for n < D / 8, the
// running max (base 2, equal on the 4 lanes of a row) and this lane's part
// of the sum (the 4 lanes' parts are added at the end).
template <int D>
struct WarpState {
  float o[D / 8][2];
  float m;
  float l;
};

// Attends the warp's rows of the tile in `stage` (q heads as mma rows),
// folding them into the state.
template <int D, int G>
__device__ __forceinline__ void attend_tile(uint32_t stage, uint32_t tile, uint32_t valid_tokens,
                                            const uint32_t (&qa)[D / 16][2], float scale_log2, uint32_t warp,
                                            uint32_t lane, WarpState<D>& st) {
  using Cfg = DecodeConfig<D, G>;
  const uint32_t row0 = warp * kWarpRows;
  // ldmatrix addresses: lane l names row l % 8 of matrix l / 8 (a piece).
  const uint32_t my_row = row0 + (lane & 7), my_piece = lane >> 3;

  // S = Q . K^T over this warp's 8 tokens: two accumulators break the mma chain.
  float s[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
  for (int m = 0; m < D / 32; ++m) {
    uint32_t kb[4];  // pieces 4m..4m+3: (b0, b1) of k-steps 2m and 2m + 1
    ldmatrix_x4<false>(stage + tile_offset<D>(my_row, 4 * m + my_piece), kb);
    mma_16816_top(s[0], qa[2 * m][0], qa[2 * m][1], kb[0], kb[1]);
    mma_16816_top(s[1], qa[2 * m + 1][0], qa[2 * m + 1][1], kb[2], kb[3]);
  }
  // This lane's two tokens: 2 (lane % 4) and + 1 of the warp's 8 rows.
  const uint32_t token0 = tile * kTileTokens + row0 + 2 * (lane & 3);
  float x0 = token0 < valid_tokens ? (s[0][0] + s[1][0]) * scale_log2 : -INFINITY;
  float x1 = token0 + 1 < valid_tokens ? (s[0][1] + s[1][1]) * scale_log2 : -INFINITY;
  float tile_max = fmaxf(x0, x1);
  tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
  tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
  // The 4 lanes of a row agree on tile_max and st.m, so on the branch.
  // (-inf) + 8 = -inf: the first tile with a valid score always rescales,
  // with alpha = 2^-inf = 0 on an empty state.
  if (tile_max > st.m + kLazyRescale) {
    const float alpha = fast_exp2(st.m - tile_max);
    st.l *= alpha;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      st.o[n][0] *= alpha;
      st.o[n][1] *= alpha;
    }
    st.m = tile_max;
  }
  // While every score so far is masked, st.m is -inf and (-inf) - (-inf)
  // would be NaN; subtracting 0 instead gives 2^-inf = 0.
  const float m_use = st.m == -INFINITY ? 0.f : st.m;
  const float p0 = fast_exp2(x0 - m_use), p1 = fast_exp2(x1 - m_use);
  st.l += p0 + p1;
  const uint32_t p_hi = pack_bf16x2(p0, p1);
  const uint32_t p_lo = pack_bf16x2(p0 - bf16_lo_to_float(p_hi), p1 - bf16_hi_to_float(p_hi));

  // O += P . V: V's rows are the k dimension, so ldmatrix transposes.
  const uint32_t v_stage = stage + Cfg::kTileKBytes;
#pragma unroll
  for (int m = 0; m < D / 32; ++m) {
    uint32_t vb[4];  // b0 of n-tiles 4m..4m+3 (dims 32m..32m+31)
    ldmatrix_x4<true>(v_stage + tile_offset<D>(my_row, 4 * m + my_piece), vb);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      mma_1688_top(st.o[4 * m + j], p_hi, vb[j]);
      mma_1688_top(st.o[4 * m + j], p_lo, vb[j]);
    }
  }
}

// Merges the warps' states through shared memory (which the pipeline no
// longer uses) into the split's normalised o [G][D] and natural-log lse [G]
// in `split_o` / `split_lse` (shared or global).
template <int D, int G>
__device__ __forceinline__ void merge_warps(unsigned char* smem, const WarpState<D>& st, uint32_t warp,
                                            uint32_t lane, float* split_o, float* split_lse) {
  float* ms = reinterpret_cast<float*>(smem);  // [kWarps][G]
  float* ls = ms + kWarps * G;                 // [kWarps][G]
  float* os = ls + kWarps * G;                 // [kWarps][G][D]
  const uint32_t row = lane >> 2, quad = lane & 3;
  float l = st.l;
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (row < G) {
    if (quad == 0) {
      ms[warp * G + row] = st.m;
      ls[warp * G + row] = l;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(os + (warp * G + row) * D + 8 * n + 2 * quad) = make_float2(st.o[n][0], st.o[n][1]);
  }
  __syncthreads();
  KVT_DECODE_PROBE_MARK(3);
  for (uint32_t i = threadIdx.x; i < G * D; i += kThreads) {
    const uint32_t g = i / D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, ms[w * G + g]);
    if (m == -INFINITY) {  // every token of the split masked, or no tokens
      split_o[i] = 0.f;
      if (i % D == 0) split_lse[g] = -INFINITY;
      continue;
    }
    float lsum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      // A warp that saw only masked rows has m = -inf: weight 0, o 0.
      const float wt = exp2f(ms[w * G + g] - m);
      lsum = fmaf(wt, ls[w * G + g], lsum);
      acc = fmaf(wt, os[(w * G + g) * D + i % D], acc);
    }
    // lsum >= 1: the warp holding the maximum kept a score within 0 of it.
    split_o[i] = acc / lsum;
    if (i % D == 0) split_lse[g] = (m + log2f(lsum)) * kLn2;
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
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint32_t slot_table[kMaxSplitBlocks];

  // The merge kernel that may follow only prepares; it waits for our results.
  allow_dependent_launch();
  KVT_DECODE_PROBE_MARK(0);

  const uint32_t list = blockIdx.x;
  const uint32_t split = blockIdx.y;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t begin = p.list_begin[list];
  const uint32_t end = p.list_begin[list + 1];
  if (end < begin || end - begin > uint64_t{gridDim.y} * p.blocks_per_split) __trap();
  const uint32_t first = split * p.blocks_per_split;
  // A split past the list's end has no tokens and gives the empty state.
  const uint32_t blocks = first < end - begin ? min(end - begin - first, p.blocks_per_split) : 0;
  uint32_t valid_tokens = blocks << p.chunk_shift;
  if (blocks > 0 && first + blocks == end - begin) {  // this split holds the list's tail block
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

  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t tiles = (valid_tokens + kTileTokens - 1) / kTileTokens;
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (static_cast<uint32_t>(s) < tiles)
      issue_tile<D, G>(smem_base + s * Cfg::kStageBytes, s, p, slot_table, valid_tokens, warp, lane);
    cp_async_commit();  // empty groups too, so that wait_group counts tiles
  }

  // Q as the mma A operand, rows = q heads: this lane's row lane / 4 (zero
  // past G), k = 2 (lane % 4) + {0, 1} of each k-step (qa[.][0]) and + 8
  // (qa[.][1]). Unscaled bf16, so that Q . K is exact up to accumulation.
  uint32_t qa[D / 16][2];
  {
    const uint32_t row = lane >> 2;
    const uint32_t* qrow =
        reinterpret_cast<const uint32_t*>(p.q + (uint64_t{list} * G + min(row, uint32_t{G - 1})) * D);
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      qa[k][0] = row < G ? __ldg(qrow + 8 * k + (lane & 3)) : 0u;
      qa[k][1] = row < G ? __ldg(qrow + 8 * k + 4 + (lane & 3)) : 0u;
    }
  }
  WarpState<D> st;
  st.m = -INFINITY;
  st.l = 0.f;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) st.o[n][0] = st.o[n][1] = 0.f;

  for (uint32_t t = 0; t < tiles; ++t) {
    // Every lane of the warp is past its ldmatrix reads of the stage read
    // in iteration t - 1 before any lane refills it.
    __syncwarp();
    const uint32_t ahead = t + Cfg::kStages - 1;
    if (ahead < tiles)
      issue_tile<D, G>(smem_base + (ahead % Cfg::kStages) * Cfg::kStageBytes, ahead, p, slot_table, valid_tokens,
                       warp, lane);
    cp_async_commit();
    cp_async_wait<Cfg::kStages - 1>();  // this lane's pieces of tile t have landed
    __syncwarp();                       // and so have the other lanes' pieces of the warp's rows
    attend_tile<D, G>(smem_base + (t % Cfg::kStages) * Cfg::kStageBytes, t, valid_tokens, qa, p.scale_log2, warp,
                      lane, st);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages before they are reused
  KVT_DECODE_PROBE_MARK(1);

  merge_warps<D, G>(smem, st, warp, lane, p.o + split * p.o_split_stride + uint64_t{list} * G * D,
                    p.lse + split * p.lse_split_stride + uint64_t{list} * G);
  KVT_DECODE_PROBE_MARK(2);
}

// ---- Host side ------------------------------------------------------------------

// Resident CTAs of decode_kernel<D, G> per SM on `device`, after allowing
// its dynamic shared memory (cached per device; the attribute is per device).
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
                       "allows " + std::to_string(optin_bytes) + " (cudaDevAttrMaxSharedMemoryPerBlockOptin)");
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
