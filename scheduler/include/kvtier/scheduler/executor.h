// The executor (DESIGN.md sections 3 and 4): runs the planner's layer plans on
// real devices. For every decode step of a layer and a batch of sequences:
//
//   append k, v to each tail block (GPU kernel, and the host copy)
//   GPU: hot-set kernel (sinks + window + tail + selected blocks already in
//        GPU slots) -- launched as soon as the selection is known
//   CPU: summary scoring and top-k per KV head (oneTBB), then plan_layer()
//   copy engine: uploads the plan chose (TieredStore mover), then a second
//        kernel over them
//   io_uring: NVMe reads of selected blocks into host staging (mover thread);
//        under LatePolicy::kSummary a late block contributes its summary
//   CPU: exact attention over host-resident selected blocks + far field
//   merge of all partial states by log-sum-exp
//   write-back of a block the append completed (home, and a GPU copy)
//
// GPU work is asynchronous on the CUDA context's compute stream; copies and
// NVMe reads run on each store's mover thread; the CPU steps are the nodes of
// a oneTBB flow graph on the CPU engine's bound threads (scoring and attention
// per sequence in parallel, and the wait for uploads beside them). On the CPU backend the "GPU" half runs
// on the CPU engine over the host stand-in of the GPU slots.
//
// SequenceKv is one sequence's KV state: its TieredStore, the summaries per
// layer (host RAM), the tail block per (layer, KV head) and where the reads
// it started stand.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvtier/core/bf16.h"
#include "kvtier/core/compute_backend.h"
#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"
#include "kvtier/core/status.h"
#include "kvtier/cpu/engine.h"
#include "kvtier/cpu/fidelity.h"
#include "kvtier/cpu/kernels.h"
#include "kvtier/scheduler/planner.h"
#include "kvtier/scheduler/trace.h"
#include "kvtier/storage/device_arena.h"
#include "kvtier/storage/tiered_store.h"

namespace kvtier::gpu {
class CudaContext;
}

namespace kvtier::scheduler {

namespace detail {
class WriteBehind;  // executor_support.h
}

// Bytes of a context per tier.
struct Placement {
  uint64_t host_home_bytes = 0;   // blocks whose durable copy is in pinned host RAM
  uint64_t nvme_home_bytes = 0;   // blocks whose durable copy is only in the NVMe file
  uint64_t gpu_cached_bytes = 0;  // blocks with a copy in GPU slots (incl. tails)
  uint64_t summary_bytes = 0;     // summaries (host RAM)
};

// Counters over decode steps (one layer of one batch = one layer step).
struct ExecutorStats {
  uint64_t layer_steps = 0;
  uint64_t selected_blocks = 0;   // selected far blocks, summed over sequences and KV heads
  uint64_t gpu_resident_blocks = 0, uploaded_blocks = 0, cpu_blocks = 0, nvme_read_blocks = 0;
  uint64_t late_blocks = 0;       // contributed by summary (LatePolicy::kSummary)
  // Late blocks whose read was not started because the sequence's read queue
  // was a decode step deep (ExecutorOptions::drop_optional_reads); they are read
  // when selected again.
  uint64_t late_reads_dropped = 0;
  // The same for the write-back's prefetch ahead (the next layer's previous
  // selection still on NVMe).
  uint64_t ahead_reads_dropped = 0;
  uint64_t kept_from_previous = 0;  // selected blocks that the previous step of the layer selected too
  uint64_t selection_compared = 0;  // selected blocks that had a previous step to compare with
  uint64_t write_backs = 0;
  uint64_t reread_blocks = 0;     // host copies evicted between landing and use, read again
  // Decode uploads the store ran on its mover, behind NVMe reads, because a
  // block was not host-resident when the upload lane took the job (evicted
  // from the staging cache since the plan, or being written home).
  uint64_t uploads_via_mover = 0;
  uint64_t gpu_scored = 0;        // sequence layer steps whose summaries the GPU scored
  double score_us = 0, gpu_wait_us = 0, cpu_attend_us = 0, upload_wait_us = 0, read_wait_us = 0, merge_us = 0;
  // Of cpu_attend_us (which also holds read_wait_us): inside the CPU engine's
  // attention and far-field calls; the rest is pins, lists and merges.
  double cpu_kernel_us = 0;
  uint64_t cpu_calls = 0;  // the CPU engine's attention and far-field calls in decode steps
  double decode_us = 0;           // wall time inside decode_layer
  // Where decode_layer's wall time goes, serially: the appends, hot-set pins
  // and GPU launches before the step's graph (prepare), the graph itself
  // (graph: scoring, plan, attention, merge, on the CPU engine's threads;
  // plan_us of it is the serial plan node: residency, planner, pins, I/O
  // issue), and the write-back after it (merge_us above).
  double prepare_us = 0, graph_us = 0, plan_us = 0;
  // Of prepare_us: waiting for the GPU's summary scores (score_on_gpu); the
  // CPU's top-k over them is in score_us.
  double gpu_score_wait_us = 0;
  // Of prepare_us: the host side of the appends with the hot-set pins
  // (prepare_host_us), and the GPU's step (staging, summary mirror, score,
  // append and hot-set launches; prepare_gpu_us, which excludes the wait above).
  double prepare_host_us = 0, prepare_gpu_us = 0;
  // Of plan_us: where the selected blocks are (store and read queries), the
  // planner itself, the store's GPU and host pins of the planned blocks
  // (plan_pin_us), starting the workers' spin (plan_warm_us), and queueing
  // the uploads and reads on the store (plan_issue_us: includes any wait for
  // room in a full request queue); the rest is the per-head bookkeeping.
  double plan_residency_us = 0, plan_planner_us = 0, plan_pin_us = 0, plan_warm_us = 0, plan_issue_us = 0;
  double prefill_us = 0;
  // Where prefill's wall time goes, serially: appending the block and staging
  // its completed chunks (GPU copies, summaries, home writes started), the
  // query pass (mean query; on a GPU also q's pinned staging) with scoring
  // and top-k, pinning the attended blocks in GPU slots (uploads included);
  // the rest is the attention itself and the wait for home writes below.
  double prefill_stage_us = 0, prefill_score_us = 0, prefill_pin_us = 0;
  uint64_t prefill_attended_blocks = 0;  // full blocks pinned for attention, summed over query blocks and layers
  // Prefill's home writes run behind its scoring and attention; this is the
  // time prefill still waited for them at the end of each call. A wait to
  // re-read a block still being written (an early join) is counted apart,
  // as part of the pin time it falls in.
  double home_write_wait_us = 0;
  uint64_t home_write_early_joins = 0;  // waits because a block in flight had to come back from home
  double home_write_early_wait_us = 0;
  // What the pin step fetched (blocks the GPU cache missed): NVMe reads and
  // uploads it caused, from the store's counters; and the home writes
  // themselves: how long each took to land (copies and NVMe writes, from
  // start, overlapped or not) and the NVMe-homed blocks among them.
  uint64_t prefill_fetch_nvme_reads = 0, prefill_fetch_uploads = 0;
  double prefill_home_write_us = 0;
  // Of it: the copies (host homes, NVMe blocks into the write buffer with
  // their checksums, through the CPU workers) and the file's NVMe writes.
  double prefill_home_write_copy_us = 0, prefill_home_write_file_us = 0;
  uint64_t prefill_home_write_nvme_blocks = 0;
  // The attention of prefill's passes, from its call to its results on the
  // host (on a GPU: the tail's upload, the lists, the kernels, the copies and
  // the synchronize; on the CPU stand-in: the engine's attention), and the
  // query-key pairs they attended, summed over q heads (4 x head_dim FLOPs
  // each: QK and PV).
  double prefill_attention_us = 0;
  uint64_t prefill_attention_pairs = 0;
  uint64_t prefill_tokens = 0;    // tokens x layers prefilled
  // Blocks a fetch into GPU slots read ahead into host staging
  // (ExecutorOptions::fetch_read_ahead), prefill's and the hot set's.
  uint64_t fetch_read_ahead_blocks = 0;
  uint64_t prefill_calls = 0;     // prefill calls: query blocks x layers
};

struct ExecutorOptions {
  ModelShape shape;
  SparsityPolicy policy;
  CostRates rates;
  LatePolicy late = LatePolicy::kWait;
  TraceRecorder* trace = nullptr;  // not owned
  // Sequences open at once. The GPU arena is split evenly between them (each
  // gets its tails plus an equal quota of slots for its cached blocks).
  uint32_t max_sequences = 1;
  uint64_t host_cache_bytes = 0;  // per sequence: the NVMe staging cache within host_bytes (0: a quarter)
  // Keep the CPU engine's workers spinning (CpuEngine::keep_warm) through a
  // decode step's serial phases, the prepare and the plan node (and, with one
  // sequence on a GPU, the waits for NVMe read rounds), so that the parallel
  // scoring and attention after them do not wait for workers to wake.
  bool warm_workers = true;
  // Wait for NVMe reads (a step's rounds, earlier steps' reads it attends,
  // and those a failed step leaves) by polling the store (up to 2 ms,
  // yielding between polls) before sleeping on it.
  bool poll_reads = true;
  // Which cached GPU copy makes room for another (storage::GpuEviction).
  storage::GpuEviction gpu_eviction = storage::GpuEviction::kHomeAware;
  // NVMe home writes per file write (storage::StoreConfig::write_batch_blocks).
  uint32_t home_write_batch_blocks = static_cast<uint32_t>(storage::kFileBatchBlocks);
  // Score summaries on the GPU (gpu::score_summaries) where a CUDA device
  // runs the step and the summaries are mean keys (mean_bf16, mean_f32): each
  // sequence mirrors its mean keys in a run of its GPU slots (its share of
  // the gpu budget, not extra memory), and only the scores come back for the
  // CPU's top-k. At 1M tokens that turns ~0.5 ms of host memory traffic per
  // layer step into a few microseconds of HBM. Off, or where the run would
  // take more than a quarter of a sequence's slots or leave it less than
  // twice its pinned hot set, the CPU scores (DESIGN.md's original split).
  bool score_on_gpu = true;
  // A late block's read (LatePolicy::kSummary) and the write-back's prefetch
  // ahead only help later steps, so they are not queued when the sequence's
  // store already has a decode step of reads queued (one request per layer):
  // a slow drive then drops them instead of stalling the plan node or the
  // write-back until the queue has room, and the blocks are read when
  // selected. Off: such reads wait for room.
  bool drop_optional_reads = true;
  // Under LatePolicy::kWait the reads of selected blocks found only on NVMe
  // go out right after the plan node's residency census, before the
  // planner, pins and uploads (the step waits for them whatever the plan
  // decides for the other blocks). Off: they go out with the uploads at the
  // end of the plan node, as before.
  bool early_reads = true;
  // Blocks a fetch into GPU slots finds only on NVMe (prefill's pin step,
  // the hot set's refill) are read into host staging in one request before
  // its upload requests, which send the host-resident blocks first. Off:
  // they are read inside the upload requests of 32 blocks, each waited for
  // in turn, as before.
  bool fetch_read_ahead = true;
};

class Executor;
struct SeqStep;  // executor_decode.cpp

// A sequence's mean keys mirrored on the GPU for scoring: a run of `slots`
// arena slots from first_slot, laid out [layer][kv_head][chunk] rows of the
// host SummaryTable's row layout; synced[layer] leading blocks of each head
// are up to date. The run goes back to the arena with this object.
struct GpuSummaries {
  GpuSummaries() = default;
  GpuSummaries(GpuSummaries&& o) noexcept { *this = std::move(o); }
  GpuSummaries& operator=(GpuSummaries&& o) noexcept;
  GpuSummaries(const GpuSummaries&) = delete;
  GpuSummaries& operator=(const GpuSummaries&) = delete;
  ~GpuSummaries() { release(); }
  void release();
  bool on() const { return slots > 0; }

  std::shared_ptr<storage::DeviceArena> arena;
  uint32_t first_slot = 0, slots = 0;
  uint64_t row_bytes = 0;   // one mean-key row as SummaryTable stores it (summary_row_bytes)
  uint64_t head_rows = 0;   // chunks per head
  std::vector<uint32_t> synced;  // [layers]
};

class SequenceKv {
 public:
  ~SequenceKv();
  uint64_t tokens(uint32_t layer) const { return layer_tokens_[layer]; }
  uint64_t max_tokens() const { return max_tokens_; }
  storage::TieredStore& store() { return *store_; }
  const storage::TieredStore& store() const { return *store_; }
  const cpu::SummaryTable& summaries(uint32_t layer) const { return summaries_[layer]; }
  const std::vector<std::vector<uint32_t>>& last_selection(uint32_t layer) const { return last_selection_[layer]; }
  // The attended set of the last decode step of `layer` (for fidelity checks).
  const cpu::AttendedSet& last_attended(uint32_t layer) const { return last_attended_[layer]; }
  Placement placement() const;

 private:
  friend class Executor;
  SequenceKv() = default;

  uint32_t flat(uint32_t layer, uint32_t h, uint32_t chunk) const {
    return (layer * kv_heads_ + h) * chunks_per_head_ + chunk;
  }
  // The flat ids of chunks_of(h) of `layer` for every KV head h, head by head.
  template <class ChunksOf>
  std::vector<uint32_t> flat_blocks(uint32_t layer, ChunksOf&& chunks_of) const {
    std::vector<uint32_t> out;
    for (uint32_t h = 0; h < kv_heads_; ++h)
      for (uint32_t c : chunks_of(h)) out.push_back(flat(layer, h, c));
    return out;
  }
  bf16* tail(uint32_t layer, uint32_t h) { return tail_.data() + (size_t{layer} * kv_heads_ + h) * tail_elems_; }
  const bf16* tail(uint32_t layer, uint32_t h) const {
    return tail_.data() + (size_t{layer} * kv_heads_ + h) * tail_elems_;
  }

  std::unique_ptr<storage::TieredStore> store_;
  std::shared_ptr<storage::DeviceArena> arena_;
  uint32_t kv_heads_ = 0, chunks_per_head_ = 0;
  uint64_t max_tokens_ = 0;
  size_t tail_elems_ = 0;                      // chunk_tokens * head_dim * 2 (K then V)
  std::vector<uint64_t> layer_tokens_;         // [layers]
  std::vector<cpu::SummaryTable> summaries_;   // [layers]
  std::vector<bf16, AlignedAllocator<bf16>> tail_;  // [layers][kv_heads] blocks (host copy)
  std::vector<uint32_t> tail_slots_;           // [layers * kv_heads] arena slots of the GPU tail copies
  // Hot-set pins per (layer, KV head): chunk -> pin of its GPU copy.
  std::vector<std::map<uint32_t, storage::BlockPin>> hot_pins_;
  std::vector<std::vector<std::vector<uint32_t>>> last_selection_;  // [layers][kv_heads]
  // Scratch for counting a head's selection kept from the last step: chunk ->
  // the stamp of the last comparison that marked it (one per head compared).
  std::vector<uint32_t> kept_mark_;
  uint32_t kept_stamp_ = 0;
  std::vector<cpu::AttendedSet> last_attended_;                      // [layers]
  // NVMe reads in flight: block -> ticket (a late block's read, still landing),
  // and each ticket's blocks, so that a landed ticket drops only its own.
  std::unordered_map<uint32_t, storage::Ticket> reading_;
  std::unordered_map<uint64_t, std::vector<uint32_t>> ticket_blocks_;
  std::vector<storage::Ticket> pending_tickets_;
  void track_reads(storage::Ticket t, std::span<const uint32_t> blocks);
  void forget_reads(storage::Ticket t);
  // How many of `now` (a head's selection, chunks) were in `before`.
  uint64_t count_kept(std::span<const uint32_t> before, std::span<const uint32_t> now);
  std::shared_ptr<std::atomic<uint32_t>> live_;  // the executor's count of open sequences
  GpuSummaries gpu_summaries_;  // empty: the CPU scores this sequence
};

// One sequence's inputs to a decode step of one layer.
struct DecodeItem {
  SequenceKv* seq = nullptr;
  std::span<const bf16> q;  // [q_heads][head_dim]
  std::span<const bf16> k;  // [kv_heads][head_dim]
  std::span<const bf16> v;
  std::span<float> out;     // [q_heads][head_dim]
};

class Executor {
 public:
  // cuda may be null: the CPU backend's stand-in is then the gpu tier and
  // the "GPU" half runs on the CPU engine.
  static Result<std::unique_ptr<Executor>> create(const ExecutorOptions& options, ComputeBackend& backend,
                                                  cpu::CpuEngine& cpu, gpu::CudaContext* cuda,
                                                  std::shared_ptr<storage::DeviceArena> arena);
  ~Executor();

  // A new context in a new file `path` (created), or one reopened from its
  // saved file and sidecar. host_bytes: homes plus staging for this context.
  Result<std::unique_ptr<SequenceKv>> create_sequence(uint64_t max_tokens, uint64_t host_bytes,
                                                      const std::filesystem::path& path, int numa_node);
  Result<std::unique_ptr<SequenceKv>> open_sequence(uint64_t host_bytes, const std::filesystem::path& path,
                                                    int numa_node);
  // Writes every block home to the file, and the summaries, tails and token
  // counts to `path`.meta (checksummed).
  Status save_sequence(SequenceKv& seq, const std::filesystem::path& path);

  Status prefill(SequenceKv& seq, uint32_t layer, uint64_t first_token, uint32_t n, std::span<const bf16> q,
                 std::span<const bf16> k, std::span<const bf16> v, std::span<float> out);
  Status decode(uint32_t layer, std::span<const DecodeItem> batch);

  // Dense fp64 attention of q over every token of `layer`, read back from all
  // tiers, against `out`, with the attended set of the last step.
  Result<cpu::FidelityReport> verify(SequenceKv& seq, uint32_t layer, std::span<const bf16> q,
                                     std::span<const float> out);

  const ExecutorOptions& options() const { return options_; }
  // Between steps only: the late-block policy of the steps that follow.
  void set_late_policy(LatePolicy late) { options_.late = late; }
  ExecutorStats stats() const { return stats_; }
  void reset_stats() { stats_ = ExecutorStats{}; }
  std::string describe() const;

  struct Gpu;  // CUDA-side buffers

 private:
  Executor(const ExecutorOptions& options, ComputeBackend& backend, cpu::CpuEngine& cpu, gpu::CudaContext* cuda,
           std::shared_ptr<storage::DeviceArena> arena);
  Status init_sequence(SequenceKv& seq, uint64_t max_tokens);
  // The store's config; a sequence that scores on the GPU (`summaries` not
  // empty) has that many fewer slots for cached blocks.
  Result<storage::StoreConfig> store_config(uint64_t max_tokens, uint64_t host_bytes, int numa_node,
                                            const GpuSummaries& summaries) const;
  // The slot run of a new sequence's GPU scoring, or an empty one where the
  // CPU scores it (no CUDA, option off, a kind the GPU does not score, or no
  // room).
  GpuSummaries reserve_gpu_summaries(uint64_t max_tokens) const;
  // Brings layer's mirrored mean keys up to `blocks` blocks per head (queued
  // on the compute stream).
  Status sync_gpu_summaries(SequenceKv& seq, uint32_t layer, uint32_t blocks);
  Result<storage::HomeWrite> begin_completed(SequenceKv& seq, uint32_t layer, std::span<const uint32_t> chunks,
                                            const bf16* blocks);
  Status write_completed(SequenceKv& seq, uint32_t layer, std::span<const uint32_t> chunks, const bf16* blocks);
  Status refresh_hot_pins(SequenceKv& seq, uint32_t layer, uint64_t tokens);
  // writing: prefill's home write in flight, if any; it is joined before a
  // block of it is fetched from home.
  Status pin_on_gpu(SequenceKv& seq, uint32_t layer, std::span<const std::vector<uint32_t>> chunks,
                    std::vector<std::vector<storage::BlockPin>>& out, detail::WriteBehind* writing = nullptr);
  Status stage_appended(SequenceKv& seq, uint32_t layer, uint64_t first_token, uint32_t n, std::span<const bf16> k,
                        std::span<const bf16> v, detail::WriteBehind& writing);
  uint32_t slot_of(const std::byte* p) const;

  ExecutorOptions options_;
  ComputeBackend& backend_;
  cpu::CpuEngine& cpu_;
  gpu::CudaContext* cuda_;
  std::shared_ptr<storage::DeviceArena> arena_;
  std::unique_ptr<Gpu> gpu_;
  ExecutorStats stats_;
  uint32_t quota_ = 0;         // gpu slots per sequence for cached blocks
  std::shared_ptr<std::atomic<uint32_t>> live_ = std::make_shared<std::atomic<uint32_t>>(0);
  void issue_round(SequenceKv& seq, SeqStep& x);
  // Starts a read into host staging that only later steps need (a late
  // block's, the prefetch ahead) and tracks it; false when drop_optional_reads
  // refused it behind a decode step of queued reads (nothing started).
  bool issue_optional_read(SequenceKv& seq, std::span<const uint32_t> blocks);
  // Waits for a read ticket (polling first under poll_reads; keep_warm: the
  // CPU workers spin meanwhile) and drops it from the sequence's bookkeeping.
  Status wait_read(SequenceKv& seq, storage::Ticket t, bool keep_warm = false);
  Result<storage::BlockPin> pin_host(SequenceKv& seq, uint32_t flat_block, uint64_t& rereads);
  void release_step(SequenceKv& seq, SeqStep& x);
  TraceLane lane_gpu_ = 0, lane_cpu_ = 0, lane_copy_ = 0, lane_nvme_ = 0, lane_write_ = 0;
};

}  // namespace kvtier::scheduler
