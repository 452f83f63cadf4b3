// The GPU half of a step (DESIGN.md sections 3, 4, 6): attention kernels over
// blocks in a device slot arena, merge of partial states, appending K/V into
// slots, summaries, and block-sparse prefill. Every launch function checks its
// arguments (a bad one is an invalid_argument Status naming the field and the
// value), launches on `stream` without synchronising, and returns the launch
// error as a Status naming the kernel. All pointers in the argument structs
// are device pointers unless a comment says otherwise.
//
// Without a CUDA build every launch function returns an unavailable Status.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvtier/core/bf16.h"
#include "kvtier/core/status.h"

// The CUDA runtime's stream type, declared as cuda_runtime.h does, so that
// users of these headers need no CUDA include path.
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace kvtier::gpu {

// A device slot arena: slot s holds one block at base + s * slot_bytes, laid
// out as stored everywhere (DESIGN.md section 2): K [chunk_tokens][head_dim]
// then V [chunk_tokens][head_dim], bf16. slot_bytes >= 2 * chunk_tokens *
// head_dim * 2 and a multiple of 16.
struct SlotArenaView {
  std::byte* base = nullptr;
  uint64_t slot_bytes = 0;
  uint32_t slots = 0;
  uint32_t chunk_tokens = 0;  // 16..256
  uint32_t head_dim = 0;      // 64 or 128
};

// ---- Sparse paged decode attention -------------------------------------------
//
// One query token per sequence. The hot set of sequence b and KV head h is
// list l = b * kv_heads + h: its blocks are slot_ids[list_begin[l] ..
// list_begin[l + 1]), in any order; every block is full except the last of the
// list, which holds last_tokens[l] valid tokens (1..chunk_tokens). An empty
// list gives its q heads the empty state (o = 0, lse = -inf). GQA: q head g of
// a sequence reads KV head g / (q_heads / kv_heads); the q heads of a group
// are processed together so that each block is read from memory once.
struct DecodeArgs {
  const bf16* q = nullptr;  // [batch][q_heads][head_dim]
  uint32_t batch = 0;       // 1..64 (more is allowed; the bench uses 1, 4, 16)
  uint32_t q_heads = 0;
  uint32_t kv_heads = 0;    // q_heads % kv_heads == 0, group q_heads / kv_heads in {1, 2, 4, 8}
  SlotArenaView arena;
  const uint32_t* list_begin = nullptr;   // [batch * kv_heads + 1]
  const uint32_t* slot_ids = nullptr;     // [list_begin[batch * kv_heads]]
  const uint32_t* last_tokens = nullptr;  // [batch * kv_heads]
  // Host-side: the longest list in blocks (an upper bound is fine). Sizes the
  // split-KV grid and the workspace; lists longer than this are an error the
  // kernel cannot see, so callers must get it right.
  uint32_t max_list_blocks = 0;
  float scale = 0;          // softmax scale, usually 1/sqrt(head_dim)
  float* o = nullptr;       // [batch][q_heads][head_dim] fp32, normalised
  float* lse = nullptr;     // [batch][q_heads], natural log
};

// How decode_attention will run these arguments on the current device.
struct DecodeLaunchPlan {
  uint32_t splits = 1;           // CTAs per list (split-KV); > 1: a merge kernel follows
  uint32_t blocks_per_split = 1;
  uint64_t workspace_bytes = 0;  // the splits' partials; 0 with one split
};
Result<DecodeLaunchPlan> decode_launch_plan(const DecodeArgs& args);

// Device workspace bytes decode_attention needs for these arguments (the
// split-KV partials); 0 when it needs none.
uint64_t decode_workspace_bytes(const DecodeArgs& args);
// Writes the partial state (o, lse) of every q head of every sequence.
Status decode_attention(const DecodeArgs& args, void* workspace, uint64_t workspace_bytes, cudaStream_t stream);

// ---- Merge of partial states --------------------------------------------------
//
// rows = batch * q_heads. Part p is o_parts[p * rows * head_dim ...] and
// lse_parts[p * rows ...]: the GPU's partial and any number of CPU partials
// uploaded in the same layout. Merged exactly by log-sum-exp (DESIGN.md
// section 10); only empty parts give the empty state, never NaN. o_out/lse_out
// may be null; out_bf16 (nullable) receives o rounded to bf16 for the next
// layer. Outputs must not alias the inputs.
struct MergeArgs {
  const float* o_parts = nullptr;    // [parts][rows][head_dim]
  const float* lse_parts = nullptr;  // [parts][rows]
  uint32_t parts = 0;                // >= 1
  uint32_t rows = 0;
  uint32_t head_dim = 0;
  float* o_out = nullptr;     // [rows][head_dim] or null
  float* lse_out = nullptr;   // [rows] or null
  bf16* out_bf16 = nullptr;   // [rows][head_dim] or null
};
Status merge_partials(const MergeArgs& args, cudaStream_t stream);

// ---- Append -------------------------------------------------------------------
//
// Decode form: the step's new K/V of every sequence, k and v
// [batch][kv_heads][head_dim], go to row rows[b] (< chunk_tokens) of slot
// slots[b * kv_heads + h].
struct AppendArgs {
  const bf16* k = nullptr;
  const bf16* v = nullptr;
  uint32_t batch = 0;
  uint32_t kv_heads = 0;
  SlotArenaView arena;
  const uint32_t* slots = nullptr;  // [batch * kv_heads]
  const uint32_t* rows = nullptr;   // [batch]
};
Status append_kv(const AppendArgs& args, cudaStream_t stream);

// Prefill form: `tokens` consecutive tokens of one sequence, k and v
// [tokens][kv_heads][head_dim], the first at absolute position first_token.
// Token first_token + t goes to chunk c = (first_token + t) / chunk_tokens,
// row (first_token + t) % chunk_tokens, slot slots[h * chunks + (c - c0)] with
// c0 = first_token / chunk_tokens and chunks = the number of chunks touched.
struct AppendRangeArgs {
  const bf16* k = nullptr;
  const bf16* v = nullptr;
  uint32_t tokens = 0;
  uint32_t kv_heads = 0;
  uint64_t first_token = 0;
  SlotArenaView arena;
  const uint32_t* slots = nullptr;  // [kv_heads][chunks]
};
Status append_kv_range(const AppendRangeArgs& args, cudaStream_t stream);

// ---- Summaries ----------------------------------------------------------------
//
// Per listed block i (slot slots[i], tokens[i] valid tokens, 1..chunk_tokens),
// in the layout the CPU scorer reads (cpu::SummaryTable rows): the mean key in
// fp32 (row stride f32_stride floats) and/or bf16 (row stride bf16_stride,
// rounded to nearest even from the fp32 mean), per-dimension key min/max in
// fp32, and the mean value in fp32. Any output may be null; rows are written
// at index i. Padding elements of a row past head_dim are left alone.
struct SummaryArgs {
  SlotArenaView arena;
  const uint32_t* slots = nullptr;   // [count]
  const uint32_t* tokens = nullptr;  // [count]
  uint32_t count = 0;
  uint32_t f32_stride = 0;     // >= head_dim
  uint32_t bf16_stride = 0;    // >= head_dim
  float* kmean = nullptr;      // [count][f32_stride]
  bf16* kmean_bf16 = nullptr;  // [count][bf16_stride]
  float* kmin = nullptr;       // [count][f32_stride]
  float* kmax = nullptr;       // [count][f32_stride]
  float* vmean = nullptr;      // [count][f32_stride]
};
Status build_summaries(const SummaryArgs& args, cudaStream_t stream);

// ---- Summary scoring (decode) ---------------------------------------------------
//
// The CPU scorer's default rule (cpu::ScoreRule::kMaxDot, DESIGN.md section
// 10) on the GPU, over mean keys kept in device memory in the layout of
// cpu::SummaryTable: for KV head h and block b in [block_begin, block_end),
//   scores[h * scores_stride + b] = max over the group's q heads g of
//                                   scale * q_g . kmean(h, b)
// in fp32 (bf16 products are exact; sums in fp32), where q head g belongs to
// KV head g / (q_heads / kv_heads) and kmean(h, b) is the row at element
// (h * head_rows + b) * row_stride, bf16 or fp32. Scores outside the range
// are left alone. Rows must be 16-byte aligned (kmean and row_stride).
struct ScoreArgs {
  const bf16* q = nullptr;  // [q_heads][head_dim]
  uint32_t q_heads = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;     // a multiple of 8, at most 256
  const void* kmean = nullptr;
  bool kmean_f32 = false;    // fp32 rows (kMeanF32); bf16 otherwise (kMeanBf16)
  uint64_t row_stride = 0;   // elements from one row to the next, >= head_dim
  uint64_t head_rows = 0;    // rows from one KV head to the next, >= block_end
  uint32_t block_begin = 0;
  uint32_t block_end = 0;
  float scale = 0;
  float* scores = nullptr;   // [kv_heads][scores_stride]
  uint64_t scores_stride = 0;  // >= block_end
};
Status score_summaries(const ScoreArgs& args, cudaStream_t stream);

// ---- Block-sparse prefill attention -------------------------------------------
//
// A query block of nq consecutive tokens of one sequence (query i at absolute
// position q_first_pos + i) attends, per KV head h, the blocks of list h:
// slot_ids[list_begin[h] .. list_begin[h + 1]), block j holding block_tokens[j]
// valid tokens whose first is at absolute position block_first_pos[j]
// (sinks, the causal window, the query block's own chunks -- appended into
// slots first -- and the blocks selected for this query block). Key positions
// greater than the query's are masked (causal). Blocks must not overlap.
// A query that sees no key gets the empty state. Online softmax on tensor cores.
struct PrefillArgs {
  const bf16* q = nullptr;  // [nq][q_heads][head_dim]
  uint32_t nq = 0;
  uint32_t q_heads = 0;
  uint32_t kv_heads = 0;    // group q_heads / kv_heads in {1, 2, 4, 8}
  uint64_t q_first_pos = 0;
  SlotArenaView arena;
  const uint32_t* list_begin = nullptr;       // [kv_heads + 1]
  const uint32_t* slot_ids = nullptr;         // [list_begin[kv_heads]]
  const uint64_t* block_first_pos = nullptr;  // [list_begin[kv_heads]]
  const uint32_t* block_tokens = nullptr;     // [list_begin[kv_heads]]
  float scale = 0;
  float* o = nullptr;       // [nq][q_heads][head_dim] fp32 or null
  bf16* out_bf16 = nullptr; // [nq][q_heads][head_dim] or null (at least one of o, out_bf16)
  float* lse = nullptr;     // [nq][q_heads] or null
};
Status prefill_attention(const PrefillArgs& args, cudaStream_t stream);

}  // namespace kvtier::gpu
