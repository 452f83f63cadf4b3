// TieredStore: one context's blocks over three tiers, and the movement between
// them (DESIGN.md sections 2 and 7). Homes are durable (pinned host RAM or the
// NVMe file); the gpu tier and the host staging cache hold copies, which are
// dropped without writing. Later layers ask "make these blocks resident there"
// (prefetch -> ticket, wait) and read them through RAII pins.
//
// Thread-safety: every public call may come from any thread. Movement runs on
// one mover thread in request order; metadata is guarded by one mutex, and
// I/O and copies run outside it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "kvtier/core/block.h"
#include "kvtier/core/compute_backend.h"
#include "kvtier/core/policy.h"
#include "kvtier/core/status.h"
#include "kvtier/storage/block_file.h"
#include "kvtier/storage/block_table.h"
#include "kvtier/storage/device_arena.h"

namespace kvtier::storage {

struct TierBudgets {
  uint64_t gpu_bytes = 0;           // gpu tier (cached copies; sinks and window stay there)
  uint64_t host_bytes = 0;          // host homes plus the staging cache for nvme homes
  uint64_t host_cache_bytes = 0;    // of host_bytes, the staging cache (0: a quarter, at least 64 slots)
};

// Which cached gpu copy makes room for another (block_table.h).
enum class GpuEviction : uint8_t {
  kHomeAware,  // host-homed copies first, least recently used first; NVMe-homed ones only when none is left
  kLru,        // least recently used, whatever the home
};
std::string_view gpu_eviction_name(GpuEviction e);

struct StoreConfig {
  ModelShape shape;
  SparsityPolicy policy;
  uint64_t max_tokens = 0;          // context capacity; the file holds every block of it
  TierBudgets budgets;
  int numa_node = -1;               // host arenas' NUMA node (-1: no binding)
  uint32_t read_batch_blocks = 256; // nvme reads handed to the file at once
  // NVMe home writes handed to the file at once (1 to kFileBatchBlocks). The
  // file holds its lock across each such write and takes it again for the
  // next, so a read that arrives meanwhile (prefill's fetch, a decode step's
  // reads) can get in between them (std::mutex promises no order); smaller
  // batches also queue fewer writes on the drive at a time. On the H200 host
  // 32 did not shorten prefill's fetch and slowed the writes
  // (bench/results/2026-11-29-e2e-h200-write-batch-ab/).
  uint32_t write_batch_blocks = static_cast<uint32_t>(kFileBatchBlocks);
  // A gpu slot arena shared with other contexts (a batch of sequences whose
  // blocks one kernel reads through one base pointer). When set, gpu_bytes is
  // not allocated again: the sinks and window must fit the shared arena's free
  // slots. Each store evicts only its own copies.
  std::shared_ptr<DeviceArena> gpu_arena;
  // Most slots of the (shared) arena this context may hold; beyond it the
  // store evicts its own copies. 0: no limit. Contexts sharing an arena get
  // quotas that sum to at most its capacity, so none starves another.
  uint32_t gpu_slot_quota = 0;
  GpuEviction gpu_eviction = GpuEviction::kHomeAware;
};

struct StoreStats {
  uint64_t nvme_reads = 0, nvme_writes = 0, host_writes = 0;
  uint64_t h2d_blocks = 0, h2d_batches = 0;
  uint64_t gpu_evictions = 0, host_cache_evictions = 0;
  uint64_t gpu_hits = 0, host_cache_hits = 0;
  // prefetch calls that found their request queue full and waited for room,
  // and the time they waited; try_prefetch calls refused for a deep queue.
  uint64_t prefetch_waits = 0, prefetches_refused = 0;
  double prefetch_wait_us = 0;
  // GPU prefetches that could not run on the upload lane (a block still to be
  // read, being written, or bad) and went to the mover's queue, behind its reads.
  uint64_t uploads_via_mover = 0;
};

class TieredStore;

// Keeps a block's copy in one tier resident while held; never evicted meanwhile.
class BlockPin {
 public:
  BlockPin() = default;
  BlockPin(BlockPin&& o) noexcept;
  BlockPin& operator=(BlockPin&& o) noexcept;
  BlockPin(const BlockPin&) = delete;
  BlockPin& operator=(const BlockPin&) = delete;
  ~BlockPin();

  // The block's bytes in that tier (a device pointer for the CUDA gpu tier).
  std::byte* data() const { return data_; }
  uint32_t block() const { return block_; }
  Tier tier() const { return tier_; }
  explicit operator bool() const { return store_ != nullptr; }

 private:
  friend class TieredStore;
  BlockPin(TieredStore* store, uint32_t block, Tier tier, std::byte* data)
      : store_(store), block_(block), tier_(tier), data_(data) {}
  void release();
  TieredStore* store_ = nullptr;
  uint32_t block_ = 0;
  Tier tier_ = Tier::kHost;
  std::byte* data_ = nullptr;
};

struct Ticket {
  uint64_t id = 0;
};

// A full block to write home: block_bytes from `data`, any host memory.
struct BlockWrite {
  uint32_t block;
  const std::byte* data;
};

// Runs body(begin, end) over sub-ranges of [0, n), each at least `grain` long
// where n allows, and returns when all are done. The store has no threads of
// its own for copies: a caller lends its pool (CpuEngine::parallel_for). An
// empty one runs the whole range on the calling thread.
using ParallelFor = std::function<void(size_t n, size_t grain, const std::function<void(size_t, size_t)>& body)>;

// One write_home split so that its slow part can run beside other work
// (prefill's write-behind, DESIGN.md section 4):
//   TieredStore::begin_write claims the blocks and makes their gpu copies;
//   land() copies them home (host memcpy, one batched NVMe write), on any one
//     thread, touching no block state;
//   finish() (or the destructor) makes them readable from home, or unreadable
//     when land() failed or never ran, and returns land()'s Status.
// Until finish() the blocks are busy: a read of one from its home fails
// (prefetch reports "a write is in progress"), so a caller that needs one of
// them back from home finishes the write first. The data behind every
// BlockWrite must stay valid until land() returns. The store must outlive it.
class HomeWrite {
 public:
  HomeWrite();
  HomeWrite(HomeWrite&& o) noexcept;
  HomeWrite& operator=(HomeWrite&& o) noexcept;
  HomeWrite(const HomeWrite&) = delete;
  HomeWrite& operator=(const HomeWrite&) = delete;
  ~HomeWrite();

  // Copies the blocks home; at most once. Safe beside any other store call.
  Status land(const ParallelFor& parallel_for = {});
  // Ends the write (idempotent); returns what land() returned.
  Status finish();
  // Whether `block` is one of this write's and the write is not finished.
  bool holds(uint32_t block) const;
  size_t size() const;  // blocks written
  size_t nvme_size() const;  // of them, blocks homed on NVMe
  // After land() returned ok: its time in copies (host homes; NVMe blocks
  // into the write buffer, with their checksums) and in the file's NVMe
  // writes. The wait for the store's one write buffer is in neither. After a
  // failed land() they hold what was timed before the failure.
  double copy_us() const;
  double file_write_us() const;

  struct State;

 private:
  friend class TieredStore;
  explicit HomeWrite(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

class TieredStore {
 public:
  // A new context in a new file at `path`. Fails at start, naming the numbers,
  // when the budgets cannot hold sinks + window on the gpu, when a budget
  // exceeds the machine, or when the disk cannot hold the file.
  static Result<std::unique_ptr<TieredStore>> create(ComputeBackend& backend, const StoreConfig& config,
                                                     std::unique_ptr<BlockFile> file);
  // A context reopened from its file: every written block is nvme-homed.
  static Result<std::unique_ptr<TieredStore>> reopen(ComputeBackend& backend, const StoreConfig& config,
                                                     std::unique_ptr<BlockFile> file);
  ~TieredStore();

  // Writes full blocks (block_bytes from each `data`, any host memory) to
  // their homes, assigning one on first write: host while host-home slots
  // last, then nvme (one batched file write). Cached copies of an earlier
  // version are dropped; a block pinned by a user, being moved, being written
  // or listed twice is an error, and then no block of the call is touched. A
  // block whose write failed is not readable until it is written again.
  using BlockWrite = storage::BlockWrite;
  // With cache_on_gpu, blocks written home also get a gpu copy while gpu
  // slots last (evicting unpinned, unprotected copies), as prefill wants for
  // the blocks it has just completed (DESIGN.md section 4). Host-home copies
  // go through parallel_for (empty: on the calling thread).
  Status write_home(std::span<const BlockWrite> writes, bool cache_on_gpu = false,
                    const ParallelFor& parallel_for = {});
  Status write_home(uint32_t block, const std::byte* data, bool cache_on_gpu = false) {
    const BlockWrite w{block, data};
    return write_home(std::span<const BlockWrite>(&w, 1), cache_on_gpu);
  }
  // write_home's first step (see HomeWrite): checks and claims the blocks and,
  // with cache_on_gpu, copies them to gpu slots from `data`. A refused call
  // touches nothing; a failed gpu copy ends the write with the blocks unwritten.
  Result<HomeWrite> begin_write(std::span<const BlockWrite> writes, bool cache_on_gpu = false);
  // Starts making `blocks` resident in `tier` (kHost or kGpu). Blocks already
  // there are touched. Blocks up to the call are bounded: a full request queue
  // makes the caller wait.
  Ticket prefetch(std::span<const uint32_t> blocks, Tier tier);
  // As prefetch, but it never waits: when `tier`'s request queue already
  // holds max_queued requests or more (the queue's own bound applies too),
  // nothing is queued and nothing returned. For reads that are optional and
  // worth less the later they land.
  std::optional<Ticket> try_prefetch(std::span<const uint32_t> blocks, Tier tier, size_t max_queued);
  // Waits for a ticket; the Status says what failed (naming block and file).
  Status wait(Ticket ticket);
  // The ticket's Status if it has finished (the ticket is then spent), or
  // nothing while it is still running. Never blocks on I/O.
  std::optional<Status> try_wait(Ticket ticket);
  // Pins a block resident in `tier`; an error if it is not resident there.
  Result<BlockPin> pin(uint32_t block, Tier tier);
  // Pins, under one lock, each of `blocks` that is resident in `tier` now:
  // out[i] is the pin of blocks[i], or an empty pin when it is not resident
  // (no error: the caller fetches it). out must hold empty pins on entry. An
  // invalid block is an error; pins made before it stay in out.
  Status pin_resident(std::span<const uint32_t> blocks, Tier tier, std::span<BlockPin> out);
  // Releases every pin of this store in `pins` under one lock (as their
  // destructors would one lock each); they are left empty. Pins of another
  // store and empty ones are left as they are.
  void release(std::span<BlockPin> pins);

  // The sequence now holds `tokens` tokens: sink and window blocks become
  // protected on the gpu; blocks that left the window become evictable.
  void set_sequence_tokens(uint64_t tokens);
  // Advances the step counter used for last-used bookkeeping.
  void set_step(uint64_t step);

  // Writes every host-homed block into the file too and flushes it, so the
  // context can be reopened by a later process. An error while a HomeWrite
  // is unfinished (its blocks would be missing from the file).
  Status save();

  Tier home_of(uint32_t block) const;
  bool resident(uint32_t block, Tier tier) const;
  // Where each of `blocks` is now, under one lock (a decode step asks this
  // of hundreds of blocks): out[i] = kGpu if blocks[i] is GPU-resident, else
  // kHost if host-resident, else kNvme. out.size() == blocks.size().
  void residency(std::span<const uint32_t> blocks, std::span<Tier> out) const;
  // residency() of blocks about to be used, which also marks each copy found
  // as used now (the tiers' LRU), so that reads issued next evict other
  // staging-cache copies first: a decode step's census before its reads.
  void census(std::span<const uint32_t> blocks, std::span<Tier> out);
  uint32_t block_count() const;
  const BlockGeometry& geometry() const;
  uint32_t chunks_per_head() const;
  uint64_t block_bytes() const;   // payload bytes (K + V)
  StoreStats stats() const;
  // GPU slots this context could fill now: free within its quota plus evictable.
  uint32_t gpu_room() const;
  // Slots of the host staging cache for NVMe-homed blocks (fixed at creation).
  uint32_t staging_slots() const;
  std::string describe() const;   // tiers, slots, how memory is pinned, how I/O runs
  BlockFile& file();
  ComputeBackend& backend();
  // The gpu tier's slot arena (shared or the store's own).
  DeviceArena& gpu_arena();

  struct Impl;

 private:
  friend class BlockPin;
  friend class HomeWrite;
  explicit TieredStore(std::unique_ptr<Impl> impl);
  void unpin(uint32_t block, Tier tier);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier::storage
