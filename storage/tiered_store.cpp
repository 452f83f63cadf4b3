#include "kvtier/storage/tiered_store.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kvtier/core/log.h"
#include "kvtier/core/sizes.h"
#include "kvtier/storage/crc32c.h"
#include "kvtier/storage/device_arena.h"
#include "kvtier/storage/host_arena.h"
#include "uring_util.h"

namespace kvtier::storage {
namespace {

// Requests waiting for the mover; a caller beyond this waits (backpressure).
constexpr size_t kMaxQueuedJobs = 64;

struct Job {
  uint64_t id;
  std::vector<uint32_t> blocks;
  Tier tier;
};

std::string block_name(const BlockGeometry& g, uint32_t block, uint32_t chunks) {
  std::ostringstream os;
  os << "block " << block << " (" << g.from_flat_index(block, chunks) << ")";
  return os.str();
}

}  // namespace

std::string_view gpu_eviction_name(GpuEviction e) {
  switch (e) {
    case GpuEviction::kHomeAware: return "home-aware";
    case GpuEviction::kLru: return "lru";
  }
  return "?";
}

struct TieredStore::Impl {
  Impl(ComputeBackend& b, const StoreConfig& c, std::unique_ptr<BlockFile> f, uint32_t chunks)
      : backend(b),
        config(c),
        geometry(c.shape, c.policy.chunk_tokens),
        chunks_per_head(chunks),
        file(std::move(f)),
        table(table_size(), make_gpu_policy(), make_lru_policy(table_size())) {}

  uint32_t table_size() const { return static_cast<uint32_t>(geometry.block_count(chunks_per_head)); }
  std::unique_ptr<EvictionPolicy> make_gpu_policy() {
    if (config.gpu_eviction == GpuEviction::kLru) return make_lru_policy(table_size());
    // Asked when a copy joins the policy, long after construction.
    return make_home_aware_policy(table_size(), [this](uint32_t b) {
      const BlockEntry& e = table[b];
      return e.home_assigned && e.home == Tier::kNvme;
    });
  }

  ComputeBackend& backend;
  StoreConfig config;
  BlockGeometry geometry;
  uint32_t chunks_per_head;
  std::unique_ptr<BlockFile> file;
  std::unique_ptr<HostArena> home_arena;   // host homes (may be absent)
  std::unique_ptr<HostArena> cache_arena;  // staging copies of nvme homes
  std::shared_ptr<DeviceArena> gpu_arena;

  mutable std::mutex mu;
  BlockTable table;
  StoreStats stats;
  uint64_t step = 0;
  uint64_t sequence_tokens = 0;
  uint64_t user_pins = 0;  // BlockPins alive: the store must outlive them
  uint64_t open_writes = 0;  // HomeWrites not finished: the store must outlive them too

  // The O_DIRECT bounce buffer of NVMe writes, kept between writes.
  std::mutex bounce_mu;
  detail::AlignedBytes bounce;
  uint64_t bounce_bytes = 0;

  // Two lanes, so that an upload never waits behind NVMe reads: the mover
  // runs reads into host staging (and any job that needs one); the uploader
  // runs GPU prefetches whose blocks are all host-resident already, and hands
  // any other to the mover's queue (behind the reads it may wait for).
  std::deque<Job> queue, upload_queue;
  std::condition_variable queue_cv, upload_cv, space_cv, done_cv;
  std::unordered_map<uint64_t, Status> done;
  uint64_t next_ticket = 1;
  bool stopping = false, stopping_uploads = false;
  std::thread mover, uploader;

  std::string name(uint32_t b) const { return block_name(geometry, b, chunks_per_head); }
  Status check_block(uint32_t b) const;

  // Mover side.
  void mover_loop();
  void uploader_loop();
  void post(uint64_t id, Status st);
  Status run_job(Job& job);
  // The uploader's job: nullopt after handing it to the mover's queue.
  std::optional<Status> run_upload(Job& job);
  std::byte* pin_locked(uint32_t block, Tier tier);
  Status stage_from_nvme(const std::vector<uint32_t>& blocks);
  Status copy_to_gpu(const std::vector<uint32_t>& blocks);
  Result<uint32_t> take_cache_slot();
  Result<uint32_t> take_gpu_slot();
  // The request queue of prefetches into `tier`.
  std::deque<Job>& lane_of(Tier tier) { return tier == Tier::kGpu ? upload_queue : queue; }
  // Gives `job` the next ticket, queues it on its lane and wakes the lane's
  // thread after releasing `lock` (its first step is to take it). Called
  // holding `lock` on mu, with room in the lane.
  Ticket queue_job(Job job, std::unique_lock<std::mutex>& lock);
  void free_gpu_slot(uint32_t slot) {
    gpu_arena->free(slot);
    --gpu_held;
  }
  // After a batched upload into slots taken for `blocks`: the copies become
  // GPU-resident when it succeeded (and count in the stats), else their
  // slots go back. Under the lock.
  void settle_gpu_copies(std::span<const uint32_t> blocks, bool copied) {
    for (uint32_t b : blocks) {
      if (copied) {
        table.gpu_cached(b);
      } else {
        free_gpu_slot(table[b].gpu_slot);
        table[b].gpu_slot = kNoSlot;
      }
    }
    if (copied && !blocks.empty()) {
      stats.h2d_blocks += blocks.size();
      ++stats.h2d_batches;
    }
  }

  uint32_t gpu_held = 0;  // arena slots this store holds (its quota's use)
  std::byte* host_copy(const BlockEntry& e) const;
  void release_host_pins(const std::vector<uint32_t>& blocks);

  // Caller side.
  Status check_rewritable(uint32_t b, const BlockEntry& e) const;
  Status check_write(std::span<const BlockWrite> writes, std::vector<uint32_t>& sorted) const;
  void claim(uint32_t b, BlockEntry& e);
  void drop_gpu_copy(uint32_t b, BlockEntry& e);
  Status cache_written_on_gpu(std::span<const BlockWrite> writes);
  void finish_locked(HomeWrite::State& w);
  void protect_range(uint64_t tokens, bool on);

  // A write's copies home, on the thread that calls HomeWrite::land.
  Status land(HomeWrite::State& w, const ParallelFor& parallel_for);
  Status land_nvme(HomeWrite::State& w, const ParallelFor& parallel_for);
  Result<std::byte*> bounce_for(uint64_t bytes);
};

// ---------------------------------------------------------------- creation

namespace {

uint64_t protected_blocks_needed(const StoreConfig& c, uint32_t chunks_per_head) {
  const uint64_t per_head = c.policy.sink_tokens / c.policy.chunk_tokens +
                            c.policy.window_tokens / c.policy.chunk_tokens + 1;  // +1: an unaligned window
  return uint64_t{c.shape.layers} * c.shape.kv_heads * std::min<uint64_t>(per_head, chunks_per_head);
}

// Shape, policy and length: checked before anything builds a BlockGeometry,
// which asserts on them.
Status check_shape(const StoreConfig& c) {
  KVT_RETURN_IF_ERROR(validate(c.shape));
  KVT_RETURN_IF_ERROR(validate(c.policy));
  if (c.max_tokens == 0) return invalid_argument("tiered store: max_tokens=0; the context needs at least one token");
  return Status::ok_status();
}

// The file and the gpu budget against the (valid) shape.
Status check_config(const StoreConfig& c, const BlockFile& file, uint32_t chunks_per_head) {
  const FileGeometry want{c.shape, c.policy.chunk_tokens, chunks_per_head};
  if (!(file.geometry() == want))
    return invalid_argument("tiered store: " + file.path() + " holds a context of another shape or length (" +
                            to_string(file.geometry().shape) + ", " + std::to_string(file.geometry().chunks_per_head) +
                            " chunks per head); expected " + to_string(c.shape) + ", " +
                            std::to_string(chunks_per_head) + " chunks per head");
  const BlockGeometry g(c.shape, c.policy.chunk_tokens);
  const uint64_t need = protected_blocks_needed(c, chunks_per_head) * g.slot_bytes();
  if (c.gpu_arena != nullptr) {
    if (c.gpu_arena->slot_bytes() != g.slot_bytes())
      return invalid_argument("tiered store: the shared gpu arena has slots of " +
                              format_bytes(c.gpu_arena->slot_bytes()) + ", this context's blocks need " +
                              format_bytes(g.slot_bytes()));
    const uint64_t free_bytes =
        uint64_t{c.gpu_slot_quota > 0 ? c.gpu_slot_quota : c.gpu_arena->free_count()} * g.slot_bytes();
    if (free_bytes < need)
      return invalid_argument("tiered store: the shared gpu arena has " + format_bytes(free_bytes) +
                              (c.gpu_slot_quota > 0 ? " for each context" : " free") + ", and this context's sink and window blocks, which stay on the gpu, need " +
                              std::to_string(protected_blocks_needed(c, chunks_per_head)) + " blocks = " +
                              format_bytes(need) + "; raise --gpu-bytes or run fewer sequences together");
    return Status::ok_status();
  }
  if (c.budgets.gpu_bytes < need)
    return invalid_argument("tiered store: gpu_bytes=" + format_bytes(c.budgets.gpu_bytes) +
                            " cannot hold the sink and window blocks, which stay on the gpu: " +
                            std::to_string(protected_blocks_needed(c, chunks_per_head)) + " blocks of " +
                            format_bytes(g.slot_bytes()) + " = " + format_bytes(need) +
                            " (layers x kv_heads x (sink_tokens + window_tokens) / chunk_tokens, +1 chunk); "
                            "raise --gpu-bytes or lower window_tokens/sink_tokens");
  return Status::ok_status();
}

// Splits host_bytes into the staging cache and host homes.
std::pair<uint64_t, uint64_t> split_host(const TierBudgets& b, uint64_t slot_bytes) {
  uint64_t cache = b.host_cache_bytes;
  if (cache == 0) cache = std::max(b.host_bytes / 4, 64 * slot_bytes);
  cache = std::min(cache, b.host_bytes);
  return {cache, b.host_bytes - cache};
}

}  // namespace

Result<std::unique_ptr<TieredStore>> TieredStore::create(ComputeBackend& backend, const StoreConfig& config,
                                                         std::unique_ptr<BlockFile> file) {
  KVT_ASSERT(file != nullptr, "TieredStore needs a file");
  KVT_RETURN_IF_ERROR(check_shape(config));
  const BlockGeometry g(config.shape, config.policy.chunk_tokens);
  const uint32_t chunks = g.chunks_for(config.max_tokens);
  KVT_RETURN_IF_ERROR(check_config(config, *file, chunks));
  if (g.block_count(chunks) >= UINT32_MAX)
    return out_of_range("tiered store: " + std::to_string(g.block_count(chunks)) + " blocks exceed 2^32");
  if (config.write_batch_blocks < 1 || config.write_batch_blocks > kFileBatchBlocks)
    return invalid_argument("tiered store: write_batch_blocks=" + std::to_string(config.write_batch_blocks) +
                            " is outside 1-" + std::to_string(kFileBatchBlocks) + "; give NVMe home writes per file write in that range");
  const auto [cache_bytes, home_bytes] = split_host(config.budgets, g.slot_bytes());
  if (cache_bytes < g.slot_bytes())
    return invalid_argument("tiered store: host_bytes=" + format_bytes(config.budgets.host_bytes) +
                            " leaves no staging cache for nvme reads; give at least " +
                            format_bytes(64 * g.slot_bytes()));
  auto impl = std::make_unique<Impl>(backend, config, std::move(file), chunks);
  HostArenaOptions host{cache_bytes, g.slot_bytes(), config.numa_node, true};
  KVT_ASSIGN_OR_RETURN(impl->cache_arena, HostArena::create(backend, host));
  if (home_bytes >= g.slot_bytes()) {
    host.budget_bytes = home_bytes;
    KVT_ASSIGN_OR_RETURN(impl->home_arena, HostArena::create(backend, host));
  }
  if (config.gpu_arena != nullptr) {
    impl->gpu_arena = config.gpu_arena;
  } else {
    KVT_ASSIGN_OR_RETURN(std::unique_ptr<DeviceArena> own,
                         DeviceArena::create(backend, config.budgets.gpu_bytes, g.slot_bytes()));
    impl->gpu_arena = std::move(own);
  }
  impl->file->device().register_buffers(impl->cache_arena->base(), impl->cache_arena->bytes());
  Impl* raw = impl.get();
  impl->mover = std::thread([raw] { raw->mover_loop(); });
  impl->uploader = std::thread([raw] { raw->uploader_loop(); });
  return std::unique_ptr<TieredStore>(new TieredStore(std::move(impl)));
}

Result<std::unique_ptr<TieredStore>> TieredStore::reopen(ComputeBackend& backend, const StoreConfig& config,
                                                         std::unique_ptr<BlockFile> file) {
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<TieredStore> store, create(backend, config, std::move(file)));
  Impl& s = *store->impl_;
  std::lock_guard lock(s.mu);
  for (uint32_t b = 0; b < s.table.size(); ++b) {
    if (!s.file->written(b)) continue;
    BlockEntry& e = s.table[b];
    e.home = Tier::kNvme;
    e.home_assigned = e.home_valid = true;
    e.checksum = s.file->checksum(b);
  }
  return store;
}

TieredStore::TieredStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

TieredStore::~TieredStore() {
  {
    std::lock_guard lock(impl_->mu);
    KVT_ASSERT(impl_->user_pins == 0, impl_->user_pins, " BlockPins outlive their TieredStore");
    KVT_ASSERT(impl_->open_writes == 0, impl_->open_writes, " unfinished HomeWrites outlive their TieredStore");
    impl_->stopping_uploads = true;
  }
  // The uploader first: it may still hand jobs to the mover.
  impl_->upload_cv.notify_all();
  impl_->uploader.join();
  {
    std::lock_guard lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->queue_cv.notify_all();
  impl_->mover.join();
  // A shared arena outlives this store: give its slots back.
  if (impl_->config.gpu_arena != nullptr) {
    for (uint32_t b = 0; b < impl_->table.size(); ++b)
      if (impl_->table[b].gpu_slot != kNoSlot) impl_->gpu_arena->free(impl_->table[b].gpu_slot);
  }
}

// ---------------------------------------------------------------- mover

void TieredStore::Impl::mover_loop() {
  for (;;) {
    std::unique_lock lock(mu);
    queue_cv.wait(lock, [&] { return stopping || !queue.empty(); });
    if (queue.empty()) return;  // stopping, and nothing left to do
    Job job = std::move(queue.front());
    queue.pop_front();
    space_cv.notify_all();
    lock.unlock();
    Status st = run_job(job);
    post(job.id, std::move(st));
  }
}

void TieredStore::Impl::post(uint64_t id, Status st) {
  std::lock_guard lock(mu);
  done.emplace(id, std::move(st));
  done_cv.notify_all();
}

void TieredStore::Impl::uploader_loop() {
  for (;;) {
    std::unique_lock lock(mu);
    upload_cv.wait(lock, [&] { return stopping_uploads || !upload_queue.empty(); });
    if (upload_queue.empty()) return;  // stopping, and nothing left to do
    Job job = std::move(upload_queue.front());
    upload_queue.pop_front();
    space_cv.notify_all();
    lock.unlock();
    std::optional<Status> st = run_upload(job);
    if (st) post(job.id, std::move(*st));
  }
}

std::optional<Status> TieredStore::Impl::run_upload(Job& job) {
  std::vector<uint32_t> need_gpu;
  {
    std::lock_guard lock(mu);
    // On the GPU already, or host-resident with no read or write in flight.
    const auto ready = [&](uint32_t b) {
      if (!check_block(b).ok()) return false;
      const BlockEntry& e = table[b];
      return e.gpu_ready || (e.home_valid && !e.busy && (e.home == Tier::kHost || e.host_cache_ready));
    };
    if (!std::all_of(job.blocks.begin(), job.blocks.end(), ready)) {
      // A block still to be read (perhaps by a read in the mover's queue),
      // being written, or invalid: the mover runs the job in order (and
      // names the error).
      queue.push_back(std::move(job));
      ++stats.uploads_via_mover;
      queue_cv.notify_one();
      return std::nullopt;
    }
    for (uint32_t b : job.blocks) {
      table.touch(b, step);
      const BlockEntry& e = table[b];
      if (e.gpu_ready) {
        ++stats.gpu_hits;
        continue;
      }
      need_gpu.push_back(b);
      if (e.home != Tier::kHost) ++stats.host_cache_hits;
    }
    // The host copies stay put until the copy ends.
    for (uint32_t b : job.blocks) table.pin_host(b);
  }
  const Status st = copy_to_gpu(need_gpu);
  std::lock_guard lock(mu);
  release_host_pins(job.blocks);
  return st;
}

Status TieredStore::Impl::check_block(uint32_t b) const {
  if (b >= table.size())
    return out_of_range("block " + std::to_string(b) + " is outside the context's " + std::to_string(table.size()) +
                        " blocks");
  return Status::ok_status();
}

std::byte* TieredStore::Impl::host_copy(const BlockEntry& e) const {
  if (e.home == Tier::kHost) return home_arena->slot_data(e.home_slot);
  return cache_arena->slot_data(e.host_cache_slot);
}

Result<uint32_t> TieredStore::Impl::take_cache_slot() {
  if (auto slot = cache_arena->allocate()) return *slot;
  const std::optional<uint32_t> victim = table.host_cache_policy().victim();
  if (!victim)
    return no_space("host staging cache full: all " + std::to_string(cache_arena->capacity()) +
                    " slots are pinned or in use by this request; raise host_cache_bytes or prefetch fewer blocks");
  const uint32_t slot = table[*victim].host_cache_slot;
  table.host_cache_dropped(*victim);  // homes are durable: dropping a copy never writes
  ++stats.host_cache_evictions;
  return slot;
}

Result<uint32_t> TieredStore::Impl::take_gpu_slot() {
  if (config.gpu_slot_quota == 0 || gpu_held < config.gpu_slot_quota) {
    if (auto slot = gpu_arena->allocate()) {
      ++gpu_held;
      return *slot;
    }
  }
  const std::optional<uint32_t> victim = table.gpu_policy().victim();
  if (!victim)
    return no_space("gpu tier full: all " + std::to_string(gpu_arena->capacity()) +
                    " slots hold pinned, sink/window or in-flight blocks; raise gpu_bytes or prefetch fewer blocks");
  const uint32_t slot = table[*victim].gpu_slot;
  table.gpu_dropped(*victim);
  ++stats.gpu_evictions;
  return slot;
}

void TieredStore::Impl::release_host_pins(const std::vector<uint32_t>& blocks) {
  for (uint32_t b : blocks) table.unpin_host(b);
}

Status TieredStore::Impl::run_job(Job& job) {
  std::vector<uint32_t> need_read, need_gpu;
  {
    std::lock_guard lock(mu);
    for (uint32_t b : job.blocks) {
      KVT_RETURN_IF_ERROR(check_block(b));
      BlockEntry& e = table[b];
      // A gpu copy made as its write began serves a busy block; its home
      // does not until the write has landed.
      const bool gpu_hit = job.tier == Tier::kGpu && e.gpu_ready;
      if (!gpu_hit && (!e.home_valid || e.busy))
        return invalid_argument(name(b) + " has not been written home" + (e.busy ? " (a write is in progress)" : ""));
      table.touch(b, step);
      if (gpu_hit) {
        ++stats.gpu_hits;
        continue;
      }
      if (job.tier == Tier::kGpu) need_gpu.push_back(b);
      if (e.home == Tier::kHost) continue;
      if (e.host_cache_ready) {
        ++stats.host_cache_hits;
      } else {
        need_read.push_back(b);
      }
    }
    // Every host copy of this job stays put until it ends, so a job is
    // either wholly resident or reports that it does not fit.
    for (uint32_t b : job.blocks) table.pin_host(b);
  }
  Status st = stage_from_nvme(need_read);
  if (st.ok()) st = copy_to_gpu(need_gpu);
  std::lock_guard lock(mu);
  release_host_pins(job.blocks);
  return st;
}

Status TieredStore::Impl::stage_from_nvme(const std::vector<uint32_t>& blocks) {
  const size_t batch = std::max<uint32_t>(1, config.read_batch_blocks);
  for (size_t begin = 0; begin < blocks.size(); begin += batch) {
    const size_t end = std::min(blocks.size(), begin + batch);
    std::vector<BlockIo> io;
    {
      std::lock_guard lock(mu);
      for (size_t i = begin; i < end; ++i) {
        Result<uint32_t> slot = take_cache_slot();
        if (!slot.ok()) {
          for (const BlockIo& done_io : io) {  // give back what this batch took
            cache_arena->free(table[static_cast<uint32_t>(done_io.index)].host_cache_slot);
            table[static_cast<uint32_t>(done_io.index)].host_cache_slot = kNoSlot;
          }
          return slot.status();
        }
        table[blocks[i]].host_cache_slot = *slot;
        io.push_back(BlockIo{blocks[i], cache_arena->slot_data(*slot)});
      }
    }
    const Status st = file->read_blocks(io);
    std::lock_guard lock(mu);
    for (const BlockIo& r : io) {
      const uint32_t b = static_cast<uint32_t>(r.index);
      if (st.ok()) {
        table.host_cached(b);
      } else {
        // A failed batch leaves nothing half-loaded: every slot goes back.
        cache_arena->free(table[b].host_cache_slot);
        table[b].host_cache_slot = kNoSlot;
      }
    }
    stats.nvme_reads += st.ok() ? io.size() : 0;
    if (!st.ok()) return st;
  }
  return Status::ok_status();
}

Status TieredStore::Impl::copy_to_gpu(const std::vector<uint32_t>& blocks) {
  if (blocks.empty()) return Status::ok_status();
  std::vector<BlockCopy> copies;
  {
    std::lock_guard lock(mu);
    for (uint32_t b : blocks) {
      Result<uint32_t> slot = take_gpu_slot();
      if (!slot.ok()) {
        for (size_t i = 0; i < copies.size(); ++i) {
          free_gpu_slot(table[blocks[i]].gpu_slot);
          table[blocks[i]].gpu_slot = kNoSlot;
        }
        return slot.status();
      }
      table[b].gpu_slot = *slot;
      copies.push_back(BlockCopy{host_copy(table[b]), gpu_arena->slot_data(*slot), geometry.block_bytes()});
    }
  }
  const Status st = backend.copy_to_device(copies);
  std::lock_guard lock(mu);
  settle_gpu_copies(blocks, st.ok());
  return st.with_context("uploading " + std::to_string(blocks.size()) + " blocks to the gpu tier");
}

// ---------------------------------------------------------------- callers

namespace {

std::vector<uint32_t> job_blocks(std::span<const uint32_t> blocks) {
  std::vector<uint32_t> v(blocks.begin(), blocks.end());
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

}  // namespace

Ticket TieredStore::Impl::queue_job(Job job, std::unique_lock<std::mutex>& lock) {
  job.id = next_ticket++;
  const Ticket ticket{job.id};
  const Tier tier = job.tier;
  lane_of(tier).push_back(std::move(job));
  lock.unlock();
  (tier == Tier::kGpu ? upload_cv : queue_cv).notify_one();
  return ticket;
}

Ticket TieredStore::prefetch(std::span<const uint32_t> blocks, Tier tier) {
  KVT_ASSERT(tier == Tier::kGpu || tier == Tier::kHost, "prefetch into ", tier_name(tier));
  Job job{0, job_blocks(blocks), tier};
  Impl& s = *impl_;
  std::unique_lock lock(s.mu);
  const std::deque<Job>& lane = s.lane_of(tier);
  if (lane.size() >= kMaxQueuedJobs) {
    const auto t0 = std::chrono::steady_clock::now();
    s.space_cv.wait(lock, [&] { return lane.size() < kMaxQueuedJobs; });
    ++s.stats.prefetch_waits;
    s.stats.prefetch_wait_us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  return s.queue_job(std::move(job), lock);
}

std::optional<Ticket> TieredStore::try_prefetch(std::span<const uint32_t> blocks, Tier tier, size_t max_queued) {
  KVT_ASSERT(tier == Tier::kGpu || tier == Tier::kHost, "try_prefetch into ", tier_name(tier));
  Job job{0, job_blocks(blocks), tier};
  Impl& s = *impl_;
  std::unique_lock lock(s.mu);
  if (s.lane_of(tier).size() >= std::min(max_queued, kMaxQueuedJobs)) {
    ++s.stats.prefetches_refused;
    return std::nullopt;
  }
  return s.queue_job(std::move(job), lock);
}

Status TieredStore::wait(Ticket ticket) {
  Impl& s = *impl_;
  std::unique_lock lock(s.mu);
  if (ticket.id == 0 || ticket.id >= s.next_ticket)
    return invalid_argument("ticket " + std::to_string(ticket.id) + " was never issued");
  s.done_cv.wait(lock, [&] { return s.done.count(ticket.id) != 0; });
  Status st = std::move(s.done.at(ticket.id));
  s.done.erase(ticket.id);
  return st;
}

std::optional<Status> TieredStore::try_wait(Ticket ticket) {
  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  if (ticket.id == 0 || ticket.id >= s.next_ticket)
    return invalid_argument("ticket " + std::to_string(ticket.id) + " was never issued");
  auto it = s.done.find(ticket.id);
  if (it == s.done.end()) return std::nullopt;
  Status st = std::move(it->second);
  s.done.erase(it);
  return st;
}

// The bytes of block's copy in `tier`, now pinned, or null when it has none
// there. Under the lock; the caller has checked the block.
std::byte* TieredStore::Impl::pin_locked(uint32_t block, Tier tier) {
  BlockEntry& e = table[block];
  if (tier == Tier::kGpu && e.gpu_ready) {
    table.pin_gpu(block);
    ++user_pins;
    return gpu_arena->slot_data(e.gpu_slot);
  }
  const bool host_home = e.home == Tier::kHost && e.home_valid && !e.busy;
  if (tier == Tier::kHost && (host_home || e.host_cache_ready)) {
    table.pin_host(block);
    ++user_pins;
    return host_copy(e);
  }
  return nullptr;
}

Result<BlockPin> TieredStore::pin(uint32_t block, Tier tier) {
  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  KVT_RETURN_IF_ERROR(s.check_block(block));
  if (std::byte* data = s.pin_locked(block, tier)) return BlockPin(this, block, tier, data);
  return unavailable(s.name(block) + " is not resident in the " + std::string(tier_name(tier)) +
                     " tier; prefetch it and wait for the ticket first");
}

Status TieredStore::pin_resident(std::span<const uint32_t> blocks, Tier tier, std::span<BlockPin> out) {
  KVT_ASSERT(out.size() == blocks.size(), "pin_resident: ", out.size(), " pins for ", blocks.size(), " blocks");
  // A pin released under the lock would take it again.
  for (const BlockPin& pin : out) KVT_ASSERT(!pin, "pin_resident: out holds a pin already");
  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  for (size_t i = 0; i < blocks.size(); ++i) {
    KVT_RETURN_IF_ERROR(s.check_block(blocks[i]));
    if (std::byte* data = s.pin_locked(blocks[i], tier)) out[i] = BlockPin(this, blocks[i], tier, data);
  }
  return Status::ok_status();
}

void TieredStore::release(std::span<BlockPin> pins) {
  std::lock_guard lock(impl_->mu);
  for (BlockPin& p : pins) {
    if (p.store_ != this) continue;
    --impl_->user_pins;
    if (p.tier_ == Tier::kGpu)
      impl_->table.unpin_gpu(p.block_);
    else
      impl_->table.unpin_host(p.block_);
    p.store_ = nullptr;
  }
}

void TieredStore::unpin(uint32_t block, Tier tier) {
  std::lock_guard lock(impl_->mu);
  --impl_->user_pins;
  if (tier == Tier::kGpu)
    impl_->table.unpin_gpu(block);
  else
    impl_->table.unpin_host(block);
}

// ---------------------------------------------------------------- writes

struct HomeWrite::State {
  TieredStore::Impl* store = nullptr;
  std::vector<BlockWrite> writes;
  std::vector<std::pair<size_t, std::byte*>> host;  // (index in writes, home slot)
  std::vector<size_t> nvme;                         // indices in writes
  std::vector<uint32_t> sorted_blocks;              // for holds()
  bool land_started = false;
  bool host_landed = false;  // the host homes hold the new bytes
  Status landed = unavailable("the write was ended before it landed; its blocks are unwritten");
  bool finished = false;
  // Where land() spent its time: copies (host homes, and NVMe blocks into
  // the bounce buffer with their checksums) and the file's writes.
  double copy_us = 0, file_write_us = 0;
};

namespace {

// Blocks per task when copying: 8 x 32 KiB is enough to amortise a task.
constexpr size_t kCopyGrainBlocks = 8;
// NVMe writes of one call go through the bounce buffer in pieces of at most
// this much, so a huge call does not hold a huge buffer.
constexpr uint64_t kBounceBytesMax = uint64_t{64} << 20;

void for_ranges(const ParallelFor& parallel_for, size_t n, size_t grain,
                const std::function<void(size_t, size_t)>& body) {
  if (n == 0) return;
  if (parallel_for)
    parallel_for(n, grain, body);
  else
    body(0, n);
}

// A block's payload into a slot-sized buffer, zero-padded so the file's
// checksum covers known bytes.
void copy_padded(std::byte* dst, const std::byte* src, uint64_t payload, uint64_t slot) {
  std::memcpy(dst, src, payload);
  if (slot > payload) std::memset(dst + payload, 0, slot - payload);
}

}  // namespace

Status TieredStore::Impl::check_rewritable(uint32_t b, const BlockEntry& e) const {
  if (e.busy) return unavailable(name(b) + " is already being written home; finish that write first");
  if (table.user_gpu_pins(b) > 0 || e.host_pins > 0)
    return invalid_argument(name(b) + " is pinned; release its pins before rewriting it");
  const bool gpu_in_flight = e.gpu_slot != kNoSlot && !e.gpu_ready;
  const bool host_in_flight = e.host_cache_slot != kNoSlot && !e.host_cache_ready;
  if (gpu_in_flight || host_in_flight)
    return unavailable(name(b) + " is being moved; wait for its ticket before rewriting it");
  return Status::ok_status();
}

// Every block of a write is checked before any is touched, so a refused
// call leaves the table as it was. Fills `sorted` with the blocks.
Status TieredStore::Impl::check_write(std::span<const BlockWrite> writes, std::vector<uint32_t>& sorted) const {
  sorted.clear();
  for (const BlockWrite& w : writes) {
    KVT_RETURN_IF_ERROR(check_block(w.block));
    if (w.data == nullptr) return invalid_argument("write of " + name(w.block) + " has no data");
    sorted.push_back(w.block);
  }
  std::sort(sorted.begin(), sorted.end());
  if (auto twice = std::adjacent_find(sorted.begin(), sorted.end()); twice != sorted.end())
    return invalid_argument(name(*twice) + " is listed twice in one write; each call writes a block once");
  for (uint32_t b : sorted) KVT_RETURN_IF_ERROR(check_rewritable(b, table[b]));
  return Status::ok_status();
}

void TieredStore::Impl::drop_gpu_copy(uint32_t b, BlockEntry& e) {
  if (!e.gpu_ready || table.user_gpu_pins(b) > 0) return;
  free_gpu_slot(e.gpu_slot);
  table.gpu_dropped(b);
}

// Drops the copies of the old version and assigns a home on first write;
// the block is busy (unreadable from home, not movable) until the write ends.
void TieredStore::Impl::claim(uint32_t b, BlockEntry& e) {
  drop_gpu_copy(b, e);
  if (e.host_cache_ready) {
    cache_arena->free(e.host_cache_slot);
    table.host_cache_dropped(b);
  }
  if (!e.home_assigned) {
    const std::optional<uint32_t> slot = home_arena ? home_arena->allocate() : std::nullopt;
    e.home = slot ? Tier::kHost : Tier::kNvme;
    e.home_slot = slot.value_or(kNoSlot);
    e.home_assigned = true;
  }
  e.busy = true;
  e.home_valid = false;
}

// GPU copies of written blocks while slots last, from the caller's data
// (the bytes that go home). Runs under the lock: nothing may take these
// half-filled slots.
Status TieredStore::Impl::cache_written_on_gpu(std::span<const BlockWrite> writes) {
  std::vector<BlockCopy> copies;
  std::vector<uint32_t> cached;
  for (const BlockWrite& w : writes) {
    Result<uint32_t> gpu_slot = take_gpu_slot();
    if (!gpu_slot.ok()) break;  // "while space allows": the rest stay uncached
    table[w.block].gpu_slot = *gpu_slot;
    cached.push_back(w.block);
    copies.push_back(BlockCopy{w.data, gpu_arena->slot_data(*gpu_slot), geometry.block_bytes()});
  }
  const Status st = backend.copy_to_device(copies);
  settle_gpu_copies(cached, st.ok());
  return st.with_context("caching " + std::to_string(cached.size()) + " written blocks on the gpu tier");
}

// The store's O_DIRECT bounce buffer, grown to at least `bytes`. Allocated
// (and faulted in) once and reused, not per write. Under bounce_mu.
Result<std::byte*> TieredStore::Impl::bounce_for(uint64_t bytes) {
  if (bytes > bounce_bytes) {
    bounce = detail::aligned_bytes(bytes, kBlockAlignBytes);  // zeroed: every page is touched now
    bounce_bytes = bounce ? bytes : 0;
    if (!bounce)
      return out_of_memory("cannot allocate " + format_bytes(bytes) + " of NVMe write buffer for " + file->path() +
                           "; free host memory or write fewer blocks per call");
  }
  return bounce.get();
}

Status TieredStore::Impl::land_nvme(HomeWrite::State& w, const ParallelFor& parallel_for) {
  const uint64_t payload = geometry.block_bytes(), slot = geometry.slot_bytes();
  const size_t per_piece = std::max<uint64_t>(1, kBounceBytesMax / slot);
  // One buffer per store: writes landing on several threads take turns.
  std::lock_guard lock(bounce_mu);
  std::vector<BlockIo> io;
  std::vector<uint32_t> crcs;
  for (size_t first = 0; first < w.nvme.size(); first += per_piece) {
    const size_t n = std::min(per_piece, w.nvme.size() - first);
    KVT_ASSIGN_OR_RETURN(std::byte* const buf, bounce_for(n * slot));
    // Each block's checksum while its bytes are still in cache, beside the
    // copy and on the same threads: the file then only issues the writes,
    // where it used to make a serial CRC pass over each batch of them first
    // (the drive idle meanwhile).
    crcs.resize(n);
    const auto c0 = std::chrono::steady_clock::now();
    for_ranges(parallel_for, n, kCopyGrainBlocks, [&](size_t begin, size_t end) {
      for (size_t k = begin; k < end; ++k) {
        copy_padded(buf + k * slot, w.writes[w.nvme[first + k]].data, payload, slot);
        crcs[k] = crc32c(buf + k * slot, slot);
      }
    });
    const auto c1 = std::chrono::steady_clock::now();
    w.copy_us += std::chrono::duration<double, std::micro>(c1 - c0).count();
    io.clear();
    for (size_t k = 0; k < n; ++k) io.push_back(BlockIo{w.writes[w.nvme[first + k]].block, buf + k * slot});
    const size_t batch = config.write_batch_blocks;  // 1 to kFileBatchBlocks (create checks it)
    for (size_t at = 0; at < n; at += batch) {
      const size_t m = std::min(batch, n - at);
      const Status st = file->write_blocks(std::span<const BlockIo>(io).subspan(at, m),
                                           std::span<const uint32_t>(crcs).subspan(at, m));
      if (!st.ok()) return st;
    }
    w.file_write_us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - c1).count();
  }
  return Status::ok_status();
}

// Copies only: the block state changes in finish_locked, on the caller's side.
Status TieredStore::Impl::land(HomeWrite::State& w, const ParallelFor& parallel_for) {
  const uint64_t payload = geometry.block_bytes(), slot = geometry.slot_bytes();
  const auto t0 = std::chrono::steady_clock::now();
  for_ranges(parallel_for, w.host.size(), kCopyGrainBlocks, [&](size_t begin, size_t end) {
    for (size_t k = begin; k < end; ++k) copy_padded(w.host[k].second, w.writes[w.host[k].first].data, payload, slot);
  });
  w.copy_us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  w.host_landed = true;
  return land_nvme(w, parallel_for);
}

void TieredStore::Impl::finish_locked(HomeWrite::State& w) {
  const bool nvme_landed = w.land_started && w.landed.ok();
  for (const auto& host : w.host) {
    BlockEntry& e = table[w.writes[host.first].block];
    e.busy = false;
    e.home_valid = w.host_landed;
    if (e.home_valid) ++stats.host_writes;
  }
  for (size_t i : w.nvme) {
    BlockEntry& e = table[w.writes[i].block];
    e.busy = false;
    // A failed batch is never read back as if it had landed.
    e.home_valid = nvme_landed;
    if (e.home_valid) e.checksum = file->checksum(w.writes[i].block);
  }
  if (nvme_landed) stats.nvme_writes += w.nvme.size();
  // A block whose write failed is unwritten in every tier. (A copy pinned by
  // a user meanwhile holds the right bytes; it goes when it is next evicted.)
  for (const BlockWrite& write : w.writes)
    if (!table[write.block].home_valid) drop_gpu_copy(write.block, table[write.block]);
  --open_writes;
  w.finished = true;
}

Result<HomeWrite> TieredStore::begin_write(std::span<const BlockWrite> writes, bool cache_on_gpu) {
  Impl& s = *impl_;
  auto w = std::make_unique<HomeWrite::State>();
  w->store = &s;
  w->writes.assign(writes.begin(), writes.end());
  std::lock_guard lock(s.mu);
  KVT_RETURN_IF_ERROR(s.check_write(writes, w->sorted_blocks));
  for (size_t i = 0; i < writes.size(); ++i) {
    BlockEntry& e = s.table[writes[i].block];
    s.claim(writes[i].block, e);
    if (e.home == Tier::kHost)
      w->host.emplace_back(i, s.home_arena->slot_data(e.home_slot));
    else
      w->nvme.push_back(i);
  }
  // In file order, so that the bounce buffer holds adjacent blocks next to
  // each other and the file writes them in large requests.
  std::sort(w->nvme.begin(), w->nvme.end(), [&](size_t a, size_t b) { return writes[a].block < writes[b].block; });
  ++s.open_writes;
  if (cache_on_gpu) {
    const Status st = s.cache_written_on_gpu(writes);
    if (!st.ok()) {
      w->landed = st;
      s.finish_locked(*w);  // nothing went home: the blocks are unwritten
      return st;
    }
  }
  return HomeWrite(std::move(w));
}

Status TieredStore::write_home(std::span<const BlockWrite> writes, bool cache_on_gpu,
                               const ParallelFor& parallel_for) {
  KVT_ASSIGN_OR_RETURN(HomeWrite write, begin_write(writes, cache_on_gpu));
  (void)write.land(parallel_for);
  return write.finish();
}

HomeWrite::HomeWrite() = default;
HomeWrite::HomeWrite(std::unique_ptr<State> state) : state_(std::move(state)) {}
HomeWrite::HomeWrite(HomeWrite&& o) noexcept = default;

HomeWrite& HomeWrite::operator=(HomeWrite&& o) noexcept {
  if (this != &o) {
    (void)finish();
    state_ = std::move(o.state_);
  }
  return *this;
}

HomeWrite::~HomeWrite() { (void)finish(); }

Status HomeWrite::land(const ParallelFor& parallel_for) {
  KVT_ASSERT(state_ != nullptr && !state_->finished, "land() of an empty or finished HomeWrite");
  KVT_ASSERT(!state_->land_started, "a HomeWrite lands once");
  state_->land_started = true;
  state_->landed = state_->store->land(*state_, parallel_for)
                       .with_context("writing " + std::to_string(state_->writes.size()) + " blocks home");
  return state_->landed;
}

Status HomeWrite::finish() {
  if (state_ == nullptr) return Status::ok_status();
  if (!state_->finished) {
    std::lock_guard lock(state_->store->mu);
    state_->store->finish_locked(*state_);
  }
  return state_->landed;
}

bool HomeWrite::holds(uint32_t block) const {
  return state_ != nullptr && !state_->finished &&
         std::binary_search(state_->sorted_blocks.begin(), state_->sorted_blocks.end(), block);
}

size_t HomeWrite::size() const { return state_ == nullptr ? 0 : state_->writes.size(); }
size_t HomeWrite::nvme_size() const { return state_ == nullptr ? 0 : state_->nvme.size(); }
double HomeWrite::copy_us() const { return state_ == nullptr ? 0 : state_->copy_us; }
double HomeWrite::file_write_us() const { return state_ == nullptr ? 0 : state_->file_write_us; }

// ---------------------------------------------------------------- protection

void TieredStore::Impl::protect_range(uint64_t tokens, bool on) {
  if (tokens == 0) return;
  const uint64_t c = config.policy.chunk_tokens;
  const uint64_t last = (tokens - 1) / c;
  const uint64_t sink_end = std::min<uint64_t>(config.policy.sink_tokens / c, last + 1);
  const uint64_t window_begin = tokens > config.policy.window_tokens ? (tokens - config.policy.window_tokens) / c : 0;
  const uint64_t rows = uint64_t{config.shape.layers} * config.shape.kv_heads;
  for (uint64_t row = 0; row < rows; ++row) {
    const uint64_t base = row * chunks_per_head;
    for (uint64_t ch = 0; ch < sink_end; ++ch) table.set_gpu_protected(static_cast<uint32_t>(base + ch), on);
    for (uint64_t ch = std::max(window_begin, sink_end); ch <= last; ++ch)
      table.set_gpu_protected(static_cast<uint32_t>(base + ch), on);
  }
}

void TieredStore::set_sequence_tokens(uint64_t tokens) {
  Impl& s = *impl_;
  KVT_ASSERT(tokens <= s.config.max_tokens, "tokens=", tokens, " exceeds max_tokens=", s.config.max_tokens);
  std::lock_guard lock(s.mu);
  // Unprotect the old set and protect the new: blocks in both end protected.
  s.protect_range(s.sequence_tokens, false);
  s.protect_range(tokens, true);
  s.sequence_tokens = tokens;
}

void TieredStore::set_step(uint64_t step) {
  std::lock_guard lock(impl_->mu);
  impl_->step = step;
}

// ---------------------------------------------------------------- save, queries

Status TieredStore::save() {
  Impl& s = *impl_;
  std::vector<BlockIo> io;
  {
    std::lock_guard lock(s.mu);
    if (s.open_writes > 0)
      return unavailable("saving " + s.file->path() + ": " + std::to_string(s.open_writes) +
                         " writes home are unfinished and their blocks would be missing; finish them first");
    for (uint32_t b = 0; b < s.table.size(); ++b) {
      BlockEntry& e = s.table[b];
      if (e.home != Tier::kHost || !e.home_valid || e.busy) continue;
      s.table.pin_host(b);  // the home slot must not be rewritten while it is saved
      io.push_back(BlockIo{b, s.home_arena->slot_data(e.home_slot)});
    }
  }
  Status st;
  const size_t batch = 1024;
  for (size_t i = 0; i < io.size() && st.ok(); i += batch)
    st = s.file->write_blocks(std::span<const BlockIo>(io).subspan(i, std::min(batch, io.size() - i)));
  {
    std::lock_guard lock(s.mu);
    for (const BlockIo& r : io) s.table.unpin_host(static_cast<uint32_t>(r.index));
  }
  KVT_RETURN_IF_ERROR(st.with_context("saving host-homed blocks to " + s.file->path()));
  return s.file->flush();
}

Tier TieredStore::home_of(uint32_t block) const {
  std::lock_guard lock(impl_->mu);
  return impl_->table[block].home;
}

namespace {

// A valid host home, or a copy in the host staging cache.
bool host_resident(const BlockEntry& e) { return (e.home == Tier::kHost && e.home_valid) || e.host_cache_ready; }

// The fastest tier holding a usable copy of the block.
Tier fastest_tier(const BlockEntry& e) { return e.gpu_ready ? Tier::kGpu : host_resident(e) ? Tier::kHost : Tier::kNvme; }

}  // namespace

bool TieredStore::resident(uint32_t block, Tier tier) const {
  std::lock_guard lock(impl_->mu);
  const BlockEntry& e = impl_->table[block];
  switch (tier) {
    case Tier::kGpu: return e.gpu_ready;
    case Tier::kHost: return host_resident(e);
    case Tier::kNvme: return impl_->file->written(block);
  }
  return false;
}

void TieredStore::residency(std::span<const uint32_t> blocks, std::span<Tier> out) const {
  KVT_ASSERT(out.size() == blocks.size(), "residency: ", blocks.size(), " blocks but ", out.size(), " outputs");
  std::lock_guard lock(impl_->mu);
  for (size_t i = 0; i < blocks.size(); ++i) out[i] = fastest_tier(impl_->table[blocks[i]]);
}

void TieredStore::census(std::span<const uint32_t> blocks, std::span<Tier> out) {
  KVT_ASSERT(out.size() == blocks.size(), "census: ", blocks.size(), " blocks but ", out.size(), " outputs");
  std::lock_guard lock(impl_->mu);
  for (size_t i = 0; i < blocks.size(); ++i) {
    out[i] = fastest_tier(impl_->table[blocks[i]]);
    if (out[i] != Tier::kNvme) impl_->table.touch(blocks[i], impl_->step);
  }
}

uint32_t TieredStore::block_count() const { return impl_->table.size(); }
const BlockGeometry& TieredStore::geometry() const { return impl_->geometry; }
uint32_t TieredStore::chunks_per_head() const { return impl_->chunks_per_head; }
uint64_t TieredStore::block_bytes() const { return impl_->geometry.block_bytes(); }
BlockFile& TieredStore::file() { return *impl_->file; }
ComputeBackend& TieredStore::backend() { return impl_->backend; }
DeviceArena& TieredStore::gpu_arena() { return *impl_->gpu_arena; }

uint32_t TieredStore::staging_slots() const { return impl_->cache_arena->capacity(); }

uint32_t TieredStore::gpu_room() const {
  std::lock_guard lock(impl_->mu);
  const uint32_t evictable = impl_->table.gpu_policy().size();
  const uint32_t quota = impl_->config.gpu_slot_quota;
  const uint32_t fresh = quota > 0 ? std::min(quota - std::min(quota, impl_->gpu_held), impl_->gpu_arena->free_count())
                                   : impl_->gpu_arena->free_count();
  return fresh + evictable;
}

StoreStats TieredStore::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->stats;
}

std::string TieredStore::describe() const {
  const Impl& s = *impl_;
  std::ostringstream os;
  os << "gpu: " << s.gpu_arena->capacity() << " slots on " << s.backend.name() << " ("
     << gpu_eviction_name(s.config.gpu_eviction) << " eviction); host homes: "
     << (s.home_arena ? s.home_arena->describe() : std::string("none")) << "; host staging: "
     << s.cache_arena->describe() << "; nvme: " << s.file->path() << " (" << s.file->device().describe() << ")";
  return os.str();
}

// ---------------------------------------------------------------- pins

BlockPin::BlockPin(BlockPin&& o) noexcept
    : store_(std::exchange(o.store_, nullptr)), block_(o.block_), tier_(o.tier_), data_(o.data_) {}

BlockPin& BlockPin::operator=(BlockPin&& o) noexcept {
  if (this != &o) {
    release();
    store_ = std::exchange(o.store_, nullptr);
    block_ = o.block_;
    tier_ = o.tier_;
    data_ = o.data_;
  }
  return *this;
}

BlockPin::~BlockPin() { release(); }

void BlockPin::release() {
  if (store_ != nullptr) store_->unpin(block_, tier_);
  store_ = nullptr;
}

}  // namespace kvtier::storage
