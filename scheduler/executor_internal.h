// The executor's CUDA side: device scratch, pinned staging and the launches
// of one step. Only the executor includes this.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "executor_support.h"
#include "kvtier/gpu/cuda_context.h"
#include "kvtier/gpu/kernels.h"
#include "kvtier/scheduler/executor.h"

namespace kvtier::scheduler {

// The scoring rule a summary kind is built for (DESIGN.md section 10).
inline cpu::ScoreRule score_rule_for(SummaryKind kind) {
  return kind == SummaryKind::kMinMaxF32 ? cpu::ScoreRule::kMinMaxBound : cpu::ScoreRule::kMaxDot;
}

// Per-(sequence, KV head) block lists of one decode kernel launch: list l =
// b * kv_heads + h holds slots[begin[l] .. begin[l + 1]); all blocks full but
// the last, which holds last[l] tokens.
struct SlotLists {
  std::vector<uint32_t> begin{0};
  std::vector<uint32_t> slots;
  std::vector<uint32_t> last;
  uint32_t longest = 0;
  void close_list(uint32_t last_tokens) {
    longest = std::max<uint32_t>(longest, static_cast<uint32_t>(slots.size()) - begin.back());
    begin.push_back(static_cast<uint32_t>(slots.size()));
    last.push_back(last_tokens);
  }
  bool empty() const { return slots.empty(); }
};

struct Executor::Gpu {
  explicit Gpu(ComputeBackend& backend)
      : host_in(backend), host_list{detail::PinnedBuffer(backend), detail::PinnedBuffer(backend)},
        host_out(backend), host_big(backend), host_q(backend), write_stage(backend), host_scores(backend) {}
  Status init(gpu::CudaContext& context);

  // Decode, in the step's order. begin_step uploads q, k, v of the batch and
  // appends k, v into the tail slots; attend() launches one decode kernel over
  // `lists` into partial `part` (0: hot set, 1: selected) and queues its
  // download; finish() waits for everything and leaves the partials in o(),
  // lse().
  Status begin_step(std::span<const DecodeItem> batch, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                    std::span<const uint32_t> tail_slots, std::span<const uint32_t> rows);
  Status attend(int part, const SlotLists& lists, uint32_t batch, uint32_t q_heads, uint32_t kv_heads,
                const gpu::SlotArenaView& arena, float scale);
  Status finish();
  // Summary scoring of the step on the GPU, queued after begin_step's upload
  // of q: for each job, the scores of its sequence's KV heads over blocks
  // [far_begin, far_end) into host_scores (rows of far_end floats from
  // float offset `offset`); `scored` is recorded behind their download.
  struct ScoreJob {
    uint32_t b = 0;  // the sequence's place in the batch (its q)
    const std::byte* kmean = nullptr;
    bool f32 = false;
    uint64_t row_stride = 0, head_rows = 0;
    uint32_t far_begin = 0, far_end = 0;
    uint64_t offset = 0;
  };
  Status score(std::span<const ScoreJob> jobs, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim, float scale);
  const float* scores(uint64_t offset) const { return detail::at<float>(host_scores.data(), offset * sizeof(float)); }
  const float* o(int part) const { return detail::at<float>(host_out.data(), out_off[part][0]); }
  const float* lse(int part) const { return detail::at<float>(host_out.data(), out_off[part][1]); }
  // GPU time of each part's kernel and its start relative to the step's origin event (ms).
  Result<std::pair<float, float>> part_span_ms(int part) const;

  Status upload_tail(const bf16* host_block, uint32_t slot, const gpu::SlotArenaView& arena, uint32_t rows,
                     uint32_t head_dim);

  // One pass of block-sparse prefill over `full` (per head, chunk indices,
  // pinned in `pins`) plus the tail when with_tail; o_host/lse_host (both or
  // neither) receive [n][q_heads][head_dim] and [n][q_heads]. q_pinned is the
  // query block staged in host_q by the caller.
  Status prefill(Executor& ex, SequenceKv& seq, uint32_t layer, uint64_t first_token, uint32_t n,
                 std::span<const bf16> q_pinned, const std::vector<std::vector<uint32_t>>& full,
                 const std::vector<std::vector<storage::BlockPin>>& pins, bool with_tail, uint32_t last_chunk,
                 float scale, float* o_host, float* lse_host);

  gpu::CudaContext* ctx = nullptr;
  detail::PinnedBuffer host_in, host_list[2], host_out, host_big;
  detail::PinnedBuffer host_q;  // a prefill query block, staged for its upload
  detail::PinnedBuffer write_stage;  // completed blocks of a prefill call, pinned for the GPU copy
  detail::PinnedBuffer host_scores;  // summary scores of a step, from the GPU
  DeviceMemory dev_in, dev_list[2], dev_out, dev_big, dev_q, workspace, dev_scores;
  uint64_t in_off_q = 0, in_off_k = 0, in_off_v = 0, in_off_slots = 0, in_off_rows = 0;
  uint64_t list_off[2][3] = {};  // per part: begin, slots, last
  uint64_t out_off[2][2] = {};   // per part: o, lse
  uint64_t out_bytes = 0;
  bool used[2] = {false, false};
  gpu::Event origin, start[2], stop[2], scored;
};

}  // namespace kvtier::scheduler
