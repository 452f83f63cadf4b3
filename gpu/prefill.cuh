// Block-sparse prefill attention on tensor cores (DESIGN.md section 4): the
// kernel template and its launcher, instantiated per head dim and GQA group
// in prefill_d64.cu / prefill_d128.cu; prefill.cu checks the arguments and
// dispatches.
//
// Shape of the work. One CTA takes one KV head and kRowsM = 128 "rows", where a
// row is a (query, q head of the group) pair: row r is query q0 + r / G, q
// head kv_head * G + r % G. Packing the group into M means every K/V tile is
// loaded into shared memory once and used by all G heads. Four warps own 32
// rows each (two m16 tiles), so every K/V fragment a warp reads from shared
// memory feeds two MMAs; a warp keeps its running max/sum and its O
// accumulator in registers for the whole list and re-reads its Q fragments
// from shared memory for each tile (there are not registers for both).
//
// The list's blocks are cut into key tiles of kTileN = 64 rows: a block of
// 64 or more tokens gives ceil(chunk/64) tiles, smaller blocks are packed
// 64/chunk to a tile. Rows past a block's valid tokens are zero-filled (a
// partial block's tail may hold garbage, and 0 * NaN in P.V would poison the
// row), and carry a masked key position. Tiles whose every key lies after
// the CTA's last query are skipped without being loaded; a warp skips the
// math of a tile that none of its rows can see, and applies the causal mask
// only to tiles that straddle its queries.
//
// Pipeline: cp.async double buffering of K and V tiles (stage s is computed
// while stage s^1 loads); a __syncthreads after each tile's math keeps the
// next prefetch from overwriting a stage another warp still reads. Two CTAs
// share an SM, so one CTA's softmax and barriers overlap the other's MMAs.
// Arithmetic: S = Q.K^T and O += P.V with mma.sync m16n8k16 bf16 -> fp32;
// softmax in the log2 domain (scale * log2 e folded into the FMA before each
// exp2, which runs on ex2.approx); P is rounded to bf16 for the P.V product,
// as FlashAttention does, and the row sum l adds the fp32 values, as it also
// does, so lse = m + ln(l) is exact to fp32 accumulation. (Adding the rounded
// values instead kept O a convex combination but put bf16's rounding, up to
// 2^-8 relative, into l: lse errors up to ln(1 + 2^-8) ~ 3.9e-3.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_check.h"
#include "kvtier/gpu/kernels.h"

namespace kvtier::gpu::prefill {

// 128 rows per CTA rather than 64 halve the K/V traffic from L2 per FLOP
// (175 vs 134 TFLOP/s on the bench's Llama-3.1-8B case, H200). 32 rows per
// warp rather than 16 halve the shared-memory reads of K and V per FLOP and
// leave room for two CTAs per SM.
inline constexpr int kWarps = 4;
inline constexpr int kWarpRows = 32;        // two m16 tiles per warp
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kRowsM = kWarpRows * kWarps;  // (query, q head) rows per CTA
inline constexpr int kCtasPerSm = 2;
inline constexpr int kTileN = 64;           // keys per tile
// Key position (relative to q_first_pos) of a padding row: later than any query.
inline constexpr int32_t kMaskedPos = INT32_MAX;
// Relative key positions are clamped to +-kPosClamp; queries are < 2^30 (the
// launcher checks nq), so clamping changes no mask decision.
inline constexpr int64_t kPosClamp = int64_t{1} << 30;

// Everything the kernel reads, by value. Pointers are device pointers.
struct Params {
  const uint16_t* q;  // bf16 bits [nq][q_heads][head_dim]
  uint32_t nq;
  uint32_t q_heads;
  uint64_t q_first_pos;
  const std::byte* arena;
  uint64_t slot_bytes;
  uint32_t slots;
  uint32_t chunk_tokens;
  const uint32_t* list_begin;
  const uint32_t* slot_ids;
  const uint64_t* block_first_pos;
  const uint32_t* block_tokens;
  float scale_log2;  // softmax scale * log2(e)
  float* o;
  uint16_t* out_bf16;
  float* lse;
  // How blocks map onto key tiles (see the file comment).
  uint32_t rows_per_block;   // min(chunk_tokens, kTileN)
  uint32_t blocks_per_tile;  // kTileN / rows_per_block
  uint32_t tiles_per_block;  // ceil(chunk_tokens / kTileN)
};

template <int D>
constexpr size_t smem_bytes() {
  // Q [kRowsM][D], K and V [2 stages][kTileN][D] bf16, key positions [2][kTileN].
  return size_t{kRowsM} * D * 2 + 2 * 2 * size_t{kTileN} * D * 2 + 2 * kTileN * sizeof(int32_t);
}
// An H100/H200 SM has 228 KiB of shared memory and reserves 1 KiB per CTA.
static_assert(kCtasPerSm * (smem_bytes<128>() + 1024) <= 228 * 1024, "kCtasPerSm CTAs must fit on one SM");

// ---- Device helpers -----------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte piece `piece` of row `row` in a [rows][D] bf16 tile.
// The piece index is XOR-swizzled with the row's low 3 bits so that the 8 row
// addresses of one ldmatrix phase land in 8 different bank groups (rows are
// 128 or 256 bytes, so unswizzled they would all hit the same banks).
template <int D>
__device__ __forceinline__ uint32_t swizzled(int row, int piece) {
  return static_cast<uint32_t>((row * D + ((piece ^ (row & 7)) << 3)) * 2);
}

// 16 bytes global -> shared, bypassing L1; zero-fills when !valid (src is
// then not read but must still be a mapped address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a (16x16, row) . b (16x8, col), bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the SFU; softmax arguments are <= ~0, and a result that flushes to
// zero is as good as the subnormal exp2f would give after rounding P to bf16.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Rounds (lo, hi) to a bf16 pair (lo in the low half, the lower column) and
// adds the unrounded values to *sum.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi, float* sum) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  *sum += lo + hi;
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The block list of the CTA's KV head (device pointers into the arguments).
// Staging it in shared memory was tried and measured no faster (165 vs 173
// TFLOP/s on the bench case): its reads are L1 hits shared by all threads.
struct ListView {
  const uint32_t* slot_ids;
  const uint32_t* tokens;
  const uint64_t* first_pos;
  uint32_t blocks;
};

// One key row of a tile: where its K row is and the key's position relative
// to q_first_pos (kMaskedPos for a padding row).
struct KeyRow {
  const uint16_t* k;
  int32_t rel_pos;
};

// Key row `c` (0..kTileN-1) of key tile `t` of the list.
template <int D>
__device__ __forceinline__ KeyRow key_row(const Params& p, const ListView& list, uint32_t t, uint32_t c) {
  const uint32_t tile_of_blocks = t / p.tiles_per_block;
  const uint32_t sub = t - tile_of_blocks * p.tiles_per_block;
  const uint32_t in_tile = c / p.rows_per_block;
  const uint32_t row = sub * kTileN + (c - in_tile * p.rows_per_block);
  const uint32_t blk = tile_of_blocks * p.blocks_per_tile + in_tile;
  KeyRow out{nullptr, kMaskedPos};
  if (in_tile >= p.blocks_per_tile || blk >= list.blocks) return out;
  const uint32_t tokens = list.tokens[blk];
  const uint32_t slot = list.slot_ids[blk];
  // A token count above chunk_tokens or a slot past the arena is a caller bug
  // the launcher cannot see (the lists live in device memory). Attending
  // something else instead would be silently wrong output, so the kernel
  // stops the stream, as the decode and append kernels do.
  if (tokens > p.chunk_tokens || slot >= p.slots) __trap();
  if (row >= tokens) return out;
  out.k = reinterpret_cast<const uint16_t*>(p.arena + uint64_t{slot} * p.slot_bytes) + size_t{row} * D;
  const int64_t rel = static_cast<int64_t>(list.first_pos[blk] + row - p.q_first_pos);
  out.rel_pos = static_cast<int32_t>(max(-kPosClamp, min(kPosClamp, rel)));
  return out;
}

// Whether any key of tile t is at or before absolute position last_q_pos.
__device__ __forceinline__ bool tile_visible(const Params& p, const ListView& list, uint32_t t, uint64_t last_q_pos) {
  const uint32_t tile_of_blocks = t / p.tiles_per_block;
  const uint32_t first_row = (t - tile_of_blocks * p.tiles_per_block) * kTileN;
  for (uint32_t b = 0; b < p.blocks_per_tile; ++b) {
    const uint32_t blk = tile_of_blocks * p.blocks_per_tile + b;
    if (blk >= list.blocks) break;
    const uint32_t tokens = min(list.tokens[blk], p.chunk_tokens);
    if (tokens > first_row && list.first_pos[blk] + first_row <= last_q_pos) return true;
  }
  return false;
}

// The first tile >= from that the CTA can see, or ntiles. Every warp computes
// the same answer with a ballot over 32 candidates at a time, so no barrier
// is needed and the result is uniform across the CTA.
__device__ __forceinline__ uint32_t next_visible_tile(const Params& p, const ListView& list, uint32_t ntiles, uint32_t from,
                                                      uint64_t last_q_pos) {
  const uint32_t lane = threadIdx.x % 32;
  for (uint32_t base = from; base < ntiles; base += 32) {
    const uint32_t t = base + lane;
    const bool vis = t < ntiles && tile_visible(p, list, t, last_q_pos);
    const uint32_t mask = __ballot_sync(0xffffffffu, vis);
    if (mask != 0) return base + __ffs(mask) - 1;
  }
  return ntiles;
}

// Issues the cp.async copies of key tile t into one stage (K, V) and writes
// its key positions. The caller commits the group.
template <int D>
__device__ __forceinline__ void load_kv_tile(const Params& p, const ListView& list, uint32_t t,
                                             uint32_t k_smem, uint32_t v_smem, int32_t* kpos) {
  constexpr int kPieces = D / 8;                     // 16-byte pieces per row
  constexpr int kRowsPerPass = kThreads / kPieces;  // 16 (D=64) or 8 (D=128)
  const int piece = threadIdx.x % kPieces;
  const size_t v_offset = size_t{p.chunk_tokens} * D;  // V follows K in the slot
  for (int row = threadIdx.x / kPieces; row < kTileN; row += kRowsPerPass) {
    const KeyRow kr = key_row<D>(p, list, t, row);
    const bool valid = kr.k != nullptr;
    const uint16_t* k_src = valid ? kr.k + piece * 8 : reinterpret_cast<const uint16_t*>(p.arena);
    const uint16_t* v_src = valid ? kr.k + v_offset + piece * 8 : k_src;
    cp_async_16(k_smem + swizzled<D>(row, piece), k_src, valid);
    cp_async_16(v_smem + swizzled<D>(row, piece), v_src, valid);
    if (piece == 0) kpos[row] = kr.rel_pos;
  }
}

// Issues the copies of the CTA's Q rows (zero rows past nq).
template <int D, int G>
__device__ __forceinline__ void load_q_tile(const Params& p, uint32_t q0, uint32_t head0, uint32_t q_smem) {
  constexpr int kPieces = D / 8;
  constexpr int kRowsPerPass = kThreads / kPieces;
  const int piece = threadIdx.x % kPieces;
  for (int row = threadIdx.x / kPieces; row < kRowsM; row += kRowsPerPass) {
    const uint32_t qi = q0 + row / G;
    const bool valid = qi < p.nq;
    const uint16_t* src = valid ? p.q + (size_t{qi} * p.q_heads + head0 + row % G) * D + piece * 8 : p.q;
    cp_async_16(q_smem + swizzled<D>(row, piece), src, valid);
  }
}

// State of the four rows a thread's fragments hold: in m16 tile mi of the
// warp, fragment row lane/4 (index 0) and lane/4 + 8 (index 1).
template <int D>
struct RowState {
  float o[2][D / 8][4];  // O accumulator [mi][n-tile j]: {row0 col, row0 col+1, row1 col, row1 col+1}
  float m[2][2];         // running max of scaled scores (log2 domain)
  float l[2][2];         // this thread's share of the running sum
};

// One key tile for one warp: S = Q.K^T, mask, online softmax, O += P.V.
// The warp's rows start at row q_row0 of the CTA, whose first query is q0
// (relative to q_first_pos). The causal mask is a warp-uniform branch rather
// than a second instance of the function, so one copy of the unrolled loop
// stays in the instruction cache (a template flag measured no faster).
template <int D, int G>
__device__ __forceinline__ void attend_tile(RowState<D>& st, uint32_t q_smem, int q_row0, int32_t q0,
                                            uint32_t k_smem, uint32_t v_smem, const int32_t* kpos, bool mask,
                                            float scale_log2) {
  const int lane = threadIdx.x % 32;
  float s[2][kTileN / 8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int j = 0; j < kTileN / 8; ++j) s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.f;

  // S (unscaled): for n-tiles 2jj, 2jj+1 (keys 16jj..16jj+15) one
  // ldmatrix.x4 gives both halves of K's k16 slice: matrices (keys +0..7,
  // dims +0..7), (+0..7, +8..15), (+8..15, +0..7), (+8..15, +8..15) = b0, b1
  // of n-tile 2jj, then of 2jj+1. Each is used by both m16 tiles.
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      const int row = q_row0 + 16 * mi + (lane & 7) + (((lane >> 3) & 1) << 3);
      ldmatrix_x4(a[mi], q_smem + swizzled<D>(row, 2 * kk + (lane >> 4)));
    }
#pragma unroll
    for (int jj = 0; jj < kTileN / 16; ++jj) {
      uint32_t b[4];
      ldmatrix_x4(b, k_smem + swizzled<D>(16 * jj + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        mma_bf16(s[mi][2 * jj], a[mi], b[0], b[1]);
        mma_bf16(s[mi][2 * jj + 1], a[mi], b[2], b[3]);
      }
    }
  }

  // Mask and row maxima of the unscaled scores (scale > 0, so the maximum is
  // the same). Element e of n-tile j is row (e < 2 ? 0 : 1), key
  // 8j + 2 * (lane % 4) + (e & 1).
  if (mask) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      // Recomputed rather than kept: the registers are all taken.
      const int row = q_row0 + 16 * mi + (lane >> 2);
      const int32_t q_rel[2] = {q0 + row / G, q0 + (row + 8) / G};
#pragma unroll
      for (int j = 0; j < kTileN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (kpos[8 * j + 2 * (lane & 3) + (e & 1)] > q_rel[e >> 1]) s[mi][j][e] = -INFINITY;
    }
  }
  float m_use[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kTileN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[mi][j][e]);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // The 4 threads of a quad hold one row between them.
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(st.m[mi][i], mx[i] * scale_log2);
      // A row that has seen no key yet keeps m = -inf; subtracting 0 instead
      // of -inf keeps exp2(-inf - m) at 0 rather than NaN.
      m_use[mi][i] = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = fast_exp2(st.m[mi][i] - m_use[mi][i]);
      st.m[mi][i] = m_new;
      st.l[mi][i] *= alpha;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        st.o[mi][n][2 * i] *= alpha;
        st.o[mi][n][2 * i + 1] *= alpha;
      }
    }
  }

  // O += P.V, P = 2^(s * scale - m) in one FMA per score. The C fragments of
  // S n-tiles 2kk, 2kk+1 are exactly the A fragment of P's k16 slice kk. V is
  // [key][dim] in shared memory, so the B fragments come from ldmatrix.trans:
  // matrices (keys +0..7, dims +0..7), (+8..15, +0..7), (+0..7, +8..15),
  // (+8..15, +8..15) = b0, b1 of dim n-tile 2dd, then of 2dd+1.
#pragma unroll
  for (int kk = 0; kk < kTileN / 16; ++kk) {
    uint32_t a[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      const float(&s0)[4] = s[mi][2 * kk];
      const float(&s1)[4] = s[mi][2 * kk + 1];
      const float n0 = -m_use[mi][0], n1 = -m_use[mi][1];
      const auto prob = [scale_log2](float x, float neg_m) { return fast_exp2(fmaf(x, scale_log2, neg_m)); };
      a[mi][0] = pack_bf16(prob(s0[0], n0), prob(s0[1], n0), &st.l[mi][0]);
      a[mi][1] = pack_bf16(prob(s0[2], n1), prob(s0[3], n1), &st.l[mi][1]);
      a[mi][2] = pack_bf16(prob(s1[0], n0), prob(s1[1], n0), &st.l[mi][0]);
      a[mi][3] = pack_bf16(prob(s1[2], n1), prob(s1[3], n1), &st.l[mi][1]);
    }
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_smem + swizzled<D>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dd + (lane >> 4)));
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        mma_bf16(st.o[mi][2 * dd], a[mi], b[0], b[1]);
        mma_bf16(st.o[mi][2 * dd + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// Normalises and writes the thread's four rows: o / l (fp32 and/or bf16) and
// lse = ln(l) + m. A row with l = 0 saw no key: (0, -inf).
template <int D, int G>
__device__ __forceinline__ void store_rows(const Params& p, RowState<D>& st, uint32_t q0, uint32_t head0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = st.l[mi][i];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = kWarpRows * warp + 16 * mi + (lane >> 2) + 8 * i;
      const uint32_t qi = q0 + row / G;
      if (qi >= p.nq) continue;
      const size_t out_row = size_t{qi} * p.q_heads + head0 + row % G;
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const size_t col = size_t{8} * n + 2 * (lane & 3);
        const float x = st.o[mi][n][2 * i] * inv, y = st.o[mi][n][2 * i + 1] * inv;
        if (p.o != nullptr) *reinterpret_cast<float2*>(p.o + out_row * D + col) = make_float2(x, y);
        if (p.out_bf16 != nullptr)
          *reinterpret_cast<__nv_bfloat162*>(p.out_bf16 + out_row * D + col) = __floats2bfloat162_rn(x, y);
      }
      if (p.lse != nullptr && (lane & 3) == 0)
        p.lse[out_row] = l > 0.f ? (st.m[mi][i] + log2f(l)) * 0.69314718055994531f : -INFINITY;
    }
  }
}

// ---- Kernel -------------------------------------------------------------------

// grid (ceil(nq / (kRowsM / G)), kv_heads), kThreads threads, smem_bytes<D>().
template <int D, int G>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) prefill_kernel(const Params p) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(kRowsM % G == 0 && 16 % G == 0, "an m16 tile holds whole queries");
  constexpr int kQueries = kRowsM / G;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t q_smem = smem_addr(smem);
  const uint32_t k_smem = q_smem + kRowsM * D * 2;
  const uint32_t v_smem = k_smem + 2 * kTileN * D * 2;
  int32_t* kpos = reinterpret_cast<int32_t*>(smem + size_t{kRowsM} * D * 2 + 4 * size_t{kTileN} * D * 2);
  constexpr uint32_t kStageBytes = kTileN * D * 2;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t kv_head = blockIdx.y;
  const uint32_t head0 = kv_head * G;
  // Later query tiles see more keys (causal); launching them first evens out
  // the tail of the grid.
  const uint32_t q0 = (gridDim.x - 1 - blockIdx.x) * kQueries;
  const uint32_t q_last = min(q0 + kQueries, p.nq) - 1;
  const uint64_t last_q_pos = p.q_first_pos + q_last;
  const uint32_t lb = p.list_begin[kv_head];
  if (p.list_begin[kv_head + 1] < lb) __trap();  // lists out of order: the loop below would not end
  const ListView list{p.slot_ids + lb, p.block_tokens + lb, p.block_first_pos + lb, p.list_begin[kv_head + 1] - lb};
  const uint32_t ntiles = (list.blocks + p.blocks_per_tile - 1) / p.blocks_per_tile * p.tiles_per_block;

  load_q_tile<D, G>(p, q0, head0, q_smem);
  cp_async_commit();
  uint32_t t = next_visible_tile(p, list, ntiles, 0, last_q_pos);
  if (t < ntiles) load_kv_tile<D>(p, list, t, k_smem, v_smem, kpos);
  cp_async_commit();

  RowState<D> st;
  const int q_row0 = kWarpRows * warp;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) st.o[mi][n][0] = st.o[mi][n][1] = st.o[mi][n][2] = st.o[mi][n][3] = 0.f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      st.m[mi][i] = -INFINITY;
      st.l[mi][i] = 0.f;
    }
  }
  const int32_t warp_q_min = static_cast<int32_t>(q0 + q_row0 / G);
  const int32_t warp_q_max = static_cast<int32_t>(q0 + (q_row0 + kWarpRows - 1) / G);

  int stage = 0;
  while (t < ntiles) {
    const uint32_t t_next = next_visible_tile(p, list, ntiles, t + 1, last_q_pos);
    if (t_next < ntiles)
      load_kv_tile<D>(p, list, t_next, k_smem + (stage ^ 1) * kStageBytes, v_smem + (stage ^ 1) * kStageBytes,
                      kpos + (stage ^ 1) * kTileN);
    cp_async_commit();   // possibly empty: keeps "all but the newest group" meaning tile t
    cp_async_wait<1>();
    __syncthreads();     // every thread's copies of Q and tile t (and its kpos stores) are visible

    const int32_t* kp = kpos + stage * kTileN;
    const int32_t kp_a = kp[lane], kp_b = kp[lane + 32];
    // Warp-uniform decisions: skip a tile none of the warp's rows can see;
    // mask only a tile holding a key later than the warp's first query.
    const bool any_visible = __any_sync(0xffffffffu, kp_a <= warp_q_max || kp_b <= warp_q_max);
    const bool need_mask = __any_sync(0xffffffffu, kp_a > warp_q_min || kp_b > warp_q_min);
    const uint32_t ks = k_smem + stage * kStageBytes, vs = v_smem + stage * kStageBytes;
    if (any_visible)
      attend_tile<D, G>(st, q_smem, q_row0, static_cast<int32_t>(q0), ks, vs, kp, need_mask, p.scale_log2);
    __syncthreads();  // stage is read by all warps before the next prefetch overwrites it
    stage ^= 1;
    t = t_next;
  }
  cp_async_wait<0>();
  store_rows<D, G>(p, st, q0, head0);
}

// ---- Host launcher ------------------------------------------------------------

// Launches prefill_kernel<D, G> for arguments prefill.cu has already checked.
template <int D, int G>
Status launch_prefill(const PrefillArgs& a, cudaStream_t stream) {
  Params p{};
  p.q = reinterpret_cast<const uint16_t*>(a.q);
  p.nq = a.nq;
  p.q_heads = a.q_heads;
  p.q_first_pos = a.q_first_pos;
  p.arena = a.arena.base;
  p.slot_bytes = a.arena.slot_bytes;
  p.slots = a.arena.slots;
  p.chunk_tokens = a.arena.chunk_tokens;
  p.list_begin = a.list_begin;
  p.slot_ids = a.slot_ids;
  p.block_first_pos = a.block_first_pos;
  p.block_tokens = a.block_tokens;
  p.scale_log2 = a.scale * 1.4426950408889634f;
  p.o = a.o;
  p.out_bf16 = reinterpret_cast<uint16_t*>(a.out_bf16);
  p.lse = a.lse;
  p.rows_per_block = a.arena.chunk_tokens < kTileN ? a.arena.chunk_tokens : kTileN;
  p.blocks_per_tile = kTileN / p.rows_per_block;
  p.tiles_per_block = (a.arena.chunk_tokens + kTileN - 1) / kTileN;

  constexpr int kQueries = kRowsM / G;
  const dim3 grid((a.nq + kQueries - 1) / kQueries, a.kv_heads);
  constexpr size_t kSmem = smem_bytes<D>();
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  KVT_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(prefill_kernel<D, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  // Left to itself the driver may size shared memory for one CTA per SM; the
  // kernel relies on kCtasPerSm of them overlapping.
  KVT_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(prefill_kernel<D, G>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                cudaSharedmemCarveoutMaxShared));
  prefill_kernel<D, G><<<grid, kThreads, kSmem, stream>>>(p);
  KVT_CUDA_RETURN_IF_LAUNCH_FAILED("prefill_kernel<" + std::to_string(D) + ", " + std::to_string(G) + ">");
  return Status::ok_status();
}

// Instantiated in prefill_d64.cu and prefill_d128.cu, so that a file using
// the launchers does not compile the kernels again.
#define KVT_PREFILL_DECLARE(D, G) extern template Status launch_prefill<D, G>(const PrefillArgs&, cudaStream_t);
KVT_PREFILL_DECLARE(64, 1)
KVT_PREFILL_DECLARE(64, 2)
KVT_PREFILL_DECLARE(64, 4)
KVT_PREFILL_DECLARE(64, 8)
KVT_PREFILL_DECLARE(128, 1)
KVT_PREFILL_DECLARE(128, 2)
KVT_PREFILL_DECLARE(128, 4)
KVT_PREFILL_DECLARE(128, 8)
#undef KVT_PREFILL_DECLARE

}  // namespace kvtier::gpu::prefill
