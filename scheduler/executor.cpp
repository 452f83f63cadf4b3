// The executor: sequences, prefill and verification. Decode is in
// executor_decode.cpp; the file format of saved sequences in executor_save.cpp.
#include "kvtier/scheduler/executor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <sstream>

#include "executor_internal.h"
#include "kvtier/core/log.h"
#include "kvtier/core/sizes.h"
#include "kvtier/cpu/reference.h"
#include "kvtier/gpu/cuda_context.h"
#include "kvtier/gpu/kernels.h"
#include "kvtier/storage/block_file.h"

namespace kvtier::scheduler {

using detail::wall_us;
using storage::Tier;

namespace {
// Blocks per request when fetching many: the staging cache holds at least 64.
constexpr size_t kFetchBatch = 32;
}  // namespace

SequenceKv::~SequenceKv() {
  if (live_ != nullptr) --*live_;
  hot_pins_.clear();  // pins before the store
  if (arena_ != nullptr)
    for (uint32_t s : tail_slots_) arena_->free(s);
  // Reads still in flight finish on the store's mover before it stops.
  if (store_ != nullptr)
    for (const auto& p : pending_tickets_) (void)store_->wait(p);
}

Placement SequenceKv::placement() const {
  Placement p;
  const uint64_t slot = store_->geometry().slot_bytes();
  const uint32_t n = store_->block_count();
  for (uint32_t b = 0; b < n; ++b) {
    if (!store_->resident(b, Tier::kHost) && !store_->resident(b, Tier::kNvme)) continue;
    if (store_->resident(b, Tier::kGpu)) p.gpu_cached_bytes += slot;
    if (store_->home_of(b) == Tier::kHost)
      p.host_home_bytes += slot;
    else
      p.nvme_home_bytes += slot;
  }
  p.gpu_cached_bytes += uint64_t(tail_slots_.size()) * slot;
  for (const auto& t : summaries_) p.summary_bytes += t.scoring_bytes() * 2;  // mean keys (or bounds) + mean values
  return p;
}

GpuSummaries& GpuSummaries::operator=(GpuSummaries&& o) noexcept {
  if (this == &o) return *this;
  release();
  arena = std::move(o.arena);
  first_slot = o.first_slot;
  slots = o.slots;
  row_bytes = o.row_bytes;
  head_rows = o.head_rows;
  synced = std::move(o.synced);
  o.slots = 0;
  return *this;
}

void GpuSummaries::release() {
  if (slots > 0 && arena != nullptr)
    for (uint32_t i = 0; i < slots; ++i) arena->free(first_slot + i);
  slots = 0;
}

Executor::Executor(const ExecutorOptions& options, ComputeBackend& backend, cpu::CpuEngine& cpu,
                   gpu::CudaContext* cuda, std::shared_ptr<storage::DeviceArena> arena)
    : options_(options), backend_(backend), cpu_(cpu), cuda_(cuda), arena_(std::move(arena)) {}

Executor::~Executor() = default;

Result<std::unique_ptr<Executor>> Executor::create(const ExecutorOptions& options, ComputeBackend& backend,
                                                   cpu::CpuEngine& cpu, gpu::CudaContext* cuda,
                                                   std::shared_ptr<storage::DeviceArena> arena) {
  KVT_RETURN_IF_ERROR(validate(options.shape));
  KVT_RETURN_IF_ERROR(validate(options.policy));
  KVT_RETURN_IF_ERROR(validate(options.rates));
  KVT_ASSERT(arena != nullptr, "the executor needs the gpu slot arena");
  const BlockGeometry g(options.shape, options.policy.chunk_tokens);
  if (arena->slot_bytes() != g.slot_bytes())
    return invalid_argument("executor: arena slots of " + format_bytes(arena->slot_bytes()) + " for blocks of " +
                            format_bytes(g.slot_bytes()));
  if (options.max_sequences == 0) return invalid_argument("executor: max_sequences=0; at least one sequence");
  const uint64_t tails = uint64_t{options.shape.layers} * options.shape.kv_heads;
  if (arena->capacity() <= tails * options.max_sequences)
    return invalid_argument("gpu tier: " + std::to_string(arena->capacity()) + " slots cannot hold the tail blocks of " +
                            std::to_string(options.max_sequences) + " sequences (" + std::to_string(tails) +
                            " each) and anything else; raise --gpu-bytes or lower the batch");
  const uint32_t quota = static_cast<uint32_t>((arena->capacity() - tails * options.max_sequences) / options.max_sequences);
  std::unique_ptr<Executor> e(new Executor(options, backend, cpu, cuda, std::move(arena)));
  e->quota_ = quota;
  e->gpu_ = std::make_unique<Gpu>(backend);
  if (cuda != nullptr) KVT_RETURN_IF_ERROR(e->gpu_->init(*cuda));
  if (options.trace != nullptr) {
    e->lane_gpu_ = options.trace->lane(cuda != nullptr ? "GPU compute" : "GPU stand-in (CPU)");
    e->lane_copy_ = options.trace->lane("copy engine (h2d uploads)");
    e->lane_cpu_ = options.trace->lane("CPU workers");
    e->lane_nvme_ = options.trace->lane("io_uring (NVMe reads)");
    e->lane_write_ = options.trace->lane("home writes (prefill, behind)");
  }
  return e;
}

std::string Executor::describe() const {
  std::ostringstream os;
  os << "executor: " << (cuda_ != nullptr ? "CUDA kernels on " + cuda_->name() : std::string("CPU stand-in for the GPU"))
     << "; arena " << arena_->capacity() << " slots of " << format_bytes(arena_->slot_bytes())
     << "; late blocks: " << late_policy_name(options_.late) << "; summaries scored on the "
     << (cuda_ != nullptr && options_.score_on_gpu ? "GPU (mean keys mirrored in GPU slots)" : "CPU") << "; "
     << cpu_.describe();
  return os.str();
}

uint32_t Executor::slot_of(const std::byte* p) const {
  const std::byte* base = arena_->slot_data(0);
  KVT_ASSERT(p >= base, "pointer below the gpu arena");
  const uint64_t off = static_cast<uint64_t>(p - base);
  KVT_ASSERT(off % arena_->slot_bytes() == 0, "pointer not at a slot start");
  return static_cast<uint32_t>(off / arena_->slot_bytes());
}

// ---------------------------------------------------------------- sequences

Status Executor::init_sequence(SequenceKv& seq, uint64_t max_tokens) {
  seq.live_ = live_;
  ++*live_;
  const ModelShape& s = options_.shape;
  const SparsityPolicy& p = options_.policy;
  seq.arena_ = arena_;
  seq.kv_heads_ = s.kv_heads;
  seq.chunks_per_head_ = seq.store_->chunks_per_head();
  seq.max_tokens_ = max_tokens;
  seq.tail_elems_ = size_t{p.chunk_tokens} * s.head_dim * 2;
  seq.layer_tokens_.assign(s.layers, 0);
  seq.summaries_.clear();
  seq.summaries_.reserve(s.layers);
  for (uint32_t l = 0; l < s.layers; ++l)
    seq.summaries_.emplace_back(s.kv_heads, seq.chunks_per_head_, s.head_dim, p.summary_kind);
  seq.tail_.assign(size_t{s.layers} * s.kv_heads * seq.tail_elems_, bf16{});
  const uint32_t tails = s.layers * s.kv_heads;
  for (uint32_t i = 0; i < tails; ++i) {
    std::optional<uint32_t> slot = arena_->allocate();
    if (!slot)
      return no_space("gpu tier: no free slot for the tail blocks of a new sequence (" + std::to_string(tails) +
                      " needed, " + std::to_string(arena_->capacity()) +
                      " slots in all); raise --gpu-bytes or run fewer sequences together");
    seq.tail_slots_.push_back(*slot);
  }
  seq.hot_pins_.clear();
  seq.hot_pins_.resize(tails);
  seq.last_selection_.assign(s.layers, std::vector<std::vector<uint32_t>>(s.kv_heads));
  seq.last_attended_.assign(s.layers, cpu::AttendedSet{});
  return Status::ok_status();
}

void SequenceKv::track_reads(storage::Ticket t, std::span<const uint32_t> blocks) {
  for (uint32_t f : blocks) reading_[f] = t;
  auto& list = ticket_blocks_[t.id];
  list.insert(list.end(), blocks.begin(), blocks.end());
}

void SequenceKv::forget_reads(storage::Ticket t) {
  auto it = ticket_blocks_.find(t.id);
  if (it == ticket_blocks_.end()) return;
  for (uint32_t f : it->second) {
    auto r = reading_.find(f);
    if (r != reading_.end() && r->second.id == t.id) reading_.erase(r);  // a later read of f keeps its entry
  }
  ticket_blocks_.erase(it);
}

uint64_t SequenceKv::count_kept(std::span<const uint32_t> before, std::span<const uint32_t> now) {
  if (++kept_stamp_ == 0) {  // wrapped: clear the marks once every 2^32 comparisons
    std::fill(kept_mark_.begin(), kept_mark_.end(), 0);
    kept_stamp_ = 1;
  }
  if (kept_mark_.size() < chunks_per_head_) kept_mark_.resize(chunks_per_head_, 0);
  for (uint32_t c : before) kept_mark_[c] = kept_stamp_;
  uint64_t kept = 0;
  for (uint32_t c : now) kept += kept_mark_[c] == kept_stamp_;
  return kept;
}

GpuSummaries Executor::reserve_gpu_summaries(uint64_t max_tokens) const {
  GpuSummaries g;
  const ModelShape& s = options_.shape;
  const SummaryKind kind = options_.policy.summary_kind;
  if (cuda_ == nullptr || !options_.score_on_gpu || options_.policy.topk_chunks == 0 ||
      (kind != SummaryKind::kMeanBf16 && kind != SummaryKind::kMeanF32))
    return g;
  const BlockGeometry geo(s, options_.policy.chunk_tokens);
  const uint64_t chunks = geo.chunks_for(max_tokens);
  const uint64_t row_bytes = summary_row_bytes(s, kind);  // for mean kinds: one mean-key row as stored
  const uint64_t bytes = uint64_t{s.layers} * s.kv_heads * chunks * row_bytes;
  const uint64_t slots = (bytes + arena_->slot_bytes() - 1) / arena_->slot_bytes();
  // The store keeps every layer's sinks and window pinned and prefill pins
  // more besides: the copy takes at most a quarter of the sequence's slots
  // and leaves at least twice the pinned hot set.
  const SparsityPolicy& p = options_.policy;
  const uint64_t hot = uint64_t{s.layers} * s.kv_heads *
                       ((p.sink_tokens + p.chunk_tokens - 1) / p.chunk_tokens +
                        (p.window_tokens + p.chunk_tokens - 1) / p.chunk_tokens + 1);
  if (slots > quota_ / 4 || quota_ - slots < 2 * hot) {
    KVT_LOG_INFO("gpu scoring: the mean keys of ", max_tokens, " tokens take ", slots, " GPU slots of this sequence's ",
                 quota_, " (more than a quarter, or too few left for twice the hot set of ", hot,
                 "); the CPU scores it (raise --gpu-bytes to score on the GPU)");
    return g;
  }
  const std::optional<uint32_t> first = arena_->allocate_run(static_cast<uint32_t>(slots));
  if (!first) {
    KVT_LOG_WARN("gpu scoring: no run of ", slots, " free GPU slots for the mean keys; the CPU scores this sequence");
    return g;
  }
  g.arena = arena_;
  g.first_slot = *first;
  g.slots = static_cast<uint32_t>(slots);
  g.row_bytes = row_bytes;
  g.head_rows = chunks;
  g.synced.assign(s.layers, 0);
  return g;
}

Status Executor::sync_gpu_summaries(SequenceKv& seq, uint32_t layer, uint32_t blocks) {
  GpuSummaries& g = seq.gpu_summaries_;
  if (!g.on() || blocks <= g.synced[layer]) return Status::ok_status();
  const cpu::SummaryTable& table = seq.summaries_[layer];
  const uint64_t table_row_bytes =
      table.kmean_row_stride() * (table.kind() == SummaryKind::kMeanBf16 ? sizeof(bf16) : sizeof(float));
  KVT_ASSERT(blocks <= table.blocks() && table.blocks() == g.head_rows && table_row_bytes == g.row_bytes, "syncing ",
             blocks, " blocks of a table of ", table.blocks(), " rows of ", table_row_bytes, " B (", g.head_rows,
             " rows of ", g.row_bytes, " B mirrored)");
  const uint32_t kvh = options_.shape.kv_heads, from = g.synced[layer];
  const auto* src = static_cast<const std::byte*>(table.kmean_rows());
  std::byte* dst = arena_->slot_data(g.first_slot) + uint64_t{layer} * kvh * g.head_rows * g.row_bytes;
  for (uint32_t h = 0; h < kvh; ++h) {
    const uint64_t row = uint64_t{h} * g.head_rows + from;
    KVT_RETURN_IF_ERROR(cuda_->copy_async(dst + row * g.row_bytes, src + row * g.row_bytes,
                                          uint64_t{blocks - from} * g.row_bytes, cuda_->compute_stream()));
  }
  g.synced[layer] = blocks;
  return Status::ok_status();
}

Result<storage::StoreConfig> Executor::store_config(uint64_t max_tokens, uint64_t host_bytes, int numa_node,
                                                    const GpuSummaries& summaries) const {
  if (live_->load() >= options_.max_sequences)
    return invalid_argument("session: " + std::to_string(live_->load()) + " sequences are open, the engine was made for " +
                            std::to_string(options_.max_sequences) + " (max_sessions); close one or raise max_sessions");
  storage::StoreConfig config;
  config.shape = options_.shape;
  config.policy = options_.policy;
  config.max_tokens = max_tokens;
  config.budgets.host_bytes = host_bytes;
  config.budgets.host_cache_bytes = options_.host_cache_bytes;
  config.numa_node = numa_node;
  config.gpu_arena = arena_;
  config.gpu_slot_quota = quota_ - summaries.slots;
  config.gpu_eviction = options_.gpu_eviction;
  config.write_batch_blocks = options_.home_write_batch_blocks;
  return config;
}

Result<std::unique_ptr<SequenceKv>> Executor::create_sequence(uint64_t max_tokens, uint64_t host_bytes,
                                                              const std::filesystem::path& path, int numa_node) {
  const ModelShape& s = options_.shape;
  const BlockGeometry g(s, options_.policy.chunk_tokens);
  if (max_tokens == 0) return invalid_argument("session: max_tokens=0; a context needs at least one token");
  GpuSummaries summaries = reserve_gpu_summaries(max_tokens);
  KVT_ASSIGN_OR_RETURN(const storage::StoreConfig config, store_config(max_tokens, host_bytes, numa_node, summaries));
  const storage::FileGeometry fg{s, options_.policy.chunk_tokens, g.chunks_for(max_tokens)};
  // The file holds only the blocks homed on NVMe (host homes fill first), so
  // it is sparse: creation checks that their share of the disk is free.
  storage::UringOptions uo;
  const uint64_t cache = config.budgets.host_cache_bytes > 0 ? config.budgets.host_cache_bytes
                                                             : std::max(host_bytes / 4, 64 * g.slot_bytes());
  const uint64_t host_homes = host_bytes > cache ? (host_bytes - cache) / g.slot_bytes() : 0;
  const uint64_t blocks = g.block_count(fg.chunks_per_head);
  uo.reserve_bytes = (blocks > host_homes ? blocks - host_homes : 0) * g.slot_bytes() + (uint64_t{64} << 20);
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<storage::BlockFile> file, storage::BlockFile::create(path.string(), fg, uo));
  std::unique_ptr<SequenceKv> seq(new SequenceKv());
  Result<std::unique_ptr<storage::TieredStore>> store = storage::TieredStore::create(backend_, config, std::move(file));
  if (!store.ok()) {
    std::error_code ec;
    std::filesystem::remove(path, ec);  // nothing left behind
    return store.status();
  }
  seq->store_ = std::move(store).value();
  seq->gpu_summaries_ = std::move(summaries);
  Status st = init_sequence(*seq, max_tokens);
  if (!st.ok()) {
    seq.reset();
    std::error_code ec;
    std::filesystem::remove(path, ec);
    return st;
  }
  return seq;
}

// ---------------------------------------------------------------- prefill

namespace {

// One parallel pass over a query block's rows [n][row]: copies them to
// `copy_to` when given (the pinned staging of the GPU upload) and, when
// want_mean, returns their mean per q head (what the block's far chunks are
// scored against). Each task takes a token range, copies it and sums its
// rows while they are in cache; the partial sums are then added per element.
std::vector<bf16> query_pass(cpu::CpuEngine& cpu, std::span<const bf16> q, uint32_t n, uint32_t row, bf16* copy_to,
                             bool want_mean) {
  if (copy_to == nullptr && !want_mean) return {};
  const size_t parts = std::min<size_t>(n, 64);
  std::vector<float> partial(want_mean ? parts * row : 0, 0.f);
  cpu.parallel_for(parts, 1, [&](size_t begin, size_t end) {
    for (size_t t = begin; t < end; ++t) {
      const size_t first = t * n / parts, last = (t + 1) * n / parts;
      if (copy_to != nullptr)
        std::memcpy(copy_to + first * row, q.data() + first * row, (last - first) * row * sizeof(bf16));
      if (!want_mean) continue;
      float* acc = partial.data() + t * row;
      for (size_t i = first; i < last; ++i) {
        const bf16* r = q.data() + i * row;
        for (uint32_t j = 0; j < row; ++j) acc[j] += to_float(r[j]);
      }
    }
  });
  if (!want_mean) return {};
  std::vector<bf16> out(row);
  cpu.parallel_for(row, 256, [&](size_t begin, size_t end) {
    for (size_t j = begin; j < end; ++j) {
      float sum = 0;
      for (size_t t = 0; t < parts; ++t) sum += partial[t * row + j];
      out[j] = bf16::from_float(sum / static_cast<float>(n));
    }
  });
  return out;
}

// The store's copies home through the engine's threads.
storage::ParallelFor engine_pool(cpu::CpuEngine& cpu) {
  return [&cpu](size_t n, size_t grain, const std::function<void(size_t, size_t)>& body) {
    cpu.parallel_for(n, grain, body);
  };
}

// A read of blocks into host staging that pin_on_gpu issues ahead of its
// upload requests; its ticket is waited for on every path out.
class ReadAhead {
 public:
  explicit ReadAhead(storage::TieredStore& store) : store_(store) {}
  ReadAhead(const ReadAhead&) = delete;
  ReadAhead& operator=(const ReadAhead&) = delete;
  ~ReadAhead() { (void)finish(); }
  void start(std::span<const uint32_t> blocks) { ticket_ = store_.prefetch(blocks, Tier::kHost); }
  // The read's Status (ok when none was started); the ticket is spent.
  Status finish() {
    if (!ticket_) return Status::ok_status();
    const storage::Ticket t = *ticket_;
    ticket_.reset();
    return store_.wait(t);
  }

 private:
  storage::TieredStore& store_;
  std::optional<storage::Ticket> ticket_;
};

// A block still being written home cannot be fetched from there: when any
// of `blocks` is in the write behind, that write lands first.
Status land_before_fetch(detail::WriteBehind* writing, std::span<const uint32_t> blocks, ExecutorStats& stats) {
  if (writing == nullptr || std::none_of(blocks.begin(), blocks.end(), [&](uint32_t b) { return writing->holds(b); }))
    return Status::ok_status();
  const double t0 = wall_us();
  const Status st = writing->join();
  stats.home_write_early_wait_us += wall_us() - t0;  // inside the caller's pin time
  ++stats.home_write_early_joins;
  return st;
}

}  // namespace

// Claims the blocks of completed chunks of `layer` for their home write, with
// GPU copies while slots last, and builds their summaries: all that the
// call's scoring and attention need. blocks holds, per chunk and KV head in
// that order, one block as stored, and must stay valid until the write lands.
Result<storage::HomeWrite> Executor::begin_completed(SequenceKv& seq, uint32_t layer, std::span<const uint32_t> chunks,
                                                     const bf16* blocks) {
  const uint32_t kvh = options_.shape.kv_heads, C = options_.policy.chunk_tokens;
  if (chunks.empty()) return storage::HomeWrite();
  std::vector<storage::BlockWrite> writes;
  for (size_t i = 0; i < chunks.size(); ++i)
    for (uint32_t h = 0; h < kvh; ++h)
      writes.push_back({seq.flat(layer, h, chunks[i]),
                        reinterpret_cast<const std::byte*>(blocks + (i * kvh + h) * seq.tail_elems_)});
  KVT_ASSIGN_OR_RETURN(storage::HomeWrite write, seq.store_->begin_write(writes, /*cache_on_gpu=*/true));
  cpu_.parallel_for(writes.size(), 8, [&](size_t begin, size_t end) {
    for (size_t w = begin; w < end; ++w)
      cpu::build_summary(cpu_.isa(), cpu::HostBlock{blocks + w * seq.tail_elems_, C}, C, seq.summaries_[layer],
                         static_cast<uint32_t>(w % kvh), chunks[w / kvh]);
  });
  stats_.write_backs += chunks.size();
  return write;
}

// Writes completed chunks of `layer` home now (one batched write; GPU copies
// while slots last) and builds their summaries.
Status Executor::write_completed(SequenceKv& seq, uint32_t layer, std::span<const uint32_t> chunks,
                                 const bf16* blocks) {
  KVT_ASSIGN_OR_RETURN(storage::HomeWrite write, begin_completed(seq, layer, chunks, blocks));
  if (write.size() == 0) return Status::ok_status();
  (void)write.land(engine_pool(cpu_));
  return write.finish();
}

namespace {

// Keys of chunk c that queries at positions [first, first + n) attend, summed
// over the queries: all C of it for a query in a later chunk, the causal part
// of it for a query inside it, none for one before it.
uint64_t prefill_keys(uint64_t first, uint32_t n, uint32_t c, uint32_t C) {
  const uint64_t begin = uint64_t{c} * C, end = begin + C, last = first + n;
  uint64_t keys = 0;
  // Queries inside the chunk: position p attends p - begin + 1 keys.
  const uint64_t in0 = std::max(first, begin), in1 = std::min(last, end);
  if (in1 > in0) keys += (in0 - begin + 1 + in1 - begin) * (in1 - in0) / 2;
  // Queries after it attend all of it.
  if (last > end) keys += (last - std::max(first, end)) * C;
  return keys;
}

}  // namespace

// Pins of the GPU copies of the given chunks of (layer, h) for every h; missing
// copies are fetched first. out[h] lists the pins in `chunks` order. Copies
// already on the GPU are pinned before anything is fetched, and each fetch
// request's blocks as soon as it lands, so that a later request's uploads
// cannot evict what this call already has (the GPU tier evicts host-homed
// copies first, fresh ones included).
Status Executor::pin_on_gpu(SequenceKv& seq, uint32_t layer, std::span<const std::vector<uint32_t>> chunks,
                            std::vector<std::vector<storage::BlockPin>>& out, detail::WriteBehind* writing) {
  const uint32_t kvh = options_.shape.kv_heads;
  const std::vector<uint32_t> blocks = seq.flat_blocks(layer, [&](uint32_t h) -> const auto& { return chunks[h]; });
  std::vector<storage::BlockPin> pins(blocks.size());
  KVT_RETURN_IF_ERROR(seq.store_->pin_resident(blocks, Tier::kGpu, pins));
  std::vector<size_t> missing;  // indices into blocks
  for (size_t i = 0; i < blocks.size(); ++i)
    if (!pins[i]) missing.push_back(i);
  for (int attempt = 0; !missing.empty(); ++attempt) {
    if (attempt == 3)
      return no_space("gpu tier: " + std::to_string(missing.size()) +
                      " blocks of one step do not stay resident together; raise --gpu-bytes");
    std::vector<uint32_t> want;
    for (size_t i : missing) want.push_back(blocks[i]);
    KVT_RETURN_IF_ERROR(land_before_fetch(writing, want, stats_));
    // The blocks found only on NVMe are read into host staging together, in
    // one request of up to half the staging cache (at least kFetchBatch, which
    // the cache always holds), and their uploads go last: a few such
    // blocks spread over many upload requests, each waited for in turn, had
    // the drive read them a few at a time (prefill's fetch at 1M spent about
    // half a millisecond per read on the H200 host, validation v11). The
    // uploads of host-resident blocks run meanwhile; the store puts a GPU
    // request behind the staging read of a block it holds.
    ReadAhead ahead(*seq.store_);
    if (options_.fetch_read_ahead) {
      // The census marks the staged copies it finds as used, so that the
      // read ahead evicts other staging copies first.
      std::vector<Tier> where(want.size());
      seq.store_->census(want, where);
      std::vector<size_t> host_first, nvme_last;
      for (size_t k = 0; k < want.size(); ++k) (where[k] == Tier::kNvme ? nvme_last : host_first).push_back(missing[k]);
      if (!nvme_last.empty()) {
        // Half the cache, so that a later request's reads cannot evict these
        // before their uploads (requests run in order).
        const size_t most = std::max<size_t>(kFetchBatch, seq.store_->staging_slots() / 2);
        std::vector<uint32_t> reads;
        for (size_t k = 0; k < std::min(most, nvme_last.size()); ++k) reads.push_back(blocks[nvme_last[k]]);
        ahead.start(reads);
        stats_.fetch_read_ahead_blocks += reads.size();
        missing = std::move(host_first);
        missing.insert(missing.end(), nvme_last.begin(), nvme_last.end());
        for (size_t k = 0; k < missing.size(); ++k) want[k] = blocks[missing[k]];
      }
    }
    std::vector<size_t> again;  // evicted between landing and pinning (by another thread's request)
    // In requests of at most kFetchBatch blocks: blocks homed on NVMe pass
    // through the host staging cache, which must hold a whole request.
    for (size_t first = 0; first < want.size(); first += kFetchBatch) {
      const size_t n = std::min(kFetchBatch, want.size() - first);
      const std::span<const uint32_t> part = std::span<const uint32_t>(want).subspan(first, n);
      const double t0 = wall_us();
      KVT_RETURN_IF_ERROR(seq.store_->wait(seq.store_->prefetch(part, Tier::kGpu)));
      stats_.upload_wait_us += wall_us() - t0;
      std::vector<storage::BlockPin> landed(n);
      KVT_RETURN_IF_ERROR(seq.store_->pin_resident(part, Tier::kGpu, landed));
      for (size_t k = 0; k < n; ++k) {
        if (landed[k])
          pins[missing[first + k]] = std::move(landed[k]);
        else
          again.push_back(missing[first + k]);
      }
    }
    // A read ahead that failed is a hint lost, not an error: the upload
    // requests of its blocks read them again and report their own errors.
    (void)ahead.finish();
    missing = std::move(again);
  }
  out.clear();
  out.resize(kvh);
  size_t i = 0;
  for (uint32_t h = 0; h < kvh; ++h)
    for (size_t k = 0; k < chunks[h].size(); ++k) out[h].push_back(std::move(pins[i++]));
  return Status::ok_status();
}

// Appends k, v of tokens [first_token, first_token + n) of `layer` to its
// tail blocks. Each chunk this completes is assembled in the write stage,
// gets its GPU copy and summary now, and starts its home write in `writing`,
// which reads the stage until joined.
Status Executor::stage_appended(SequenceKv& seq, uint32_t layer, uint64_t first_token, uint32_t n,
                                std::span<const bf16> k, std::span<const bf16> v, detail::WriteBehind& writing) {
  const uint32_t C = options_.policy.chunk_tokens, d = options_.shape.head_dim, kvh = options_.shape.kv_heads;
  const size_t kvrow = size_t{kvh} * d;
  const uint64_t end = first_token + n;
  const uint32_t c0 = static_cast<uint32_t>(first_token / C), c1 = static_cast<uint32_t>((end - 1) / C);
  std::vector<uint32_t> done;  // chunks this block completes
  for (uint32_t c = c0; c <= c1; ++c)
    if ((uint64_t{c} + 1) * C <= end) done.push_back(c);
  KVT_RETURN_IF_ERROR(gpu_->write_stage.reserve(std::max<size_t>(done.size(), 1) * kvh * seq.tail_elems_ * sizeof(bf16)));
  bf16* stage = reinterpret_cast<bf16*>(gpu_->write_stage.data());
  // The first chunk may have rows from earlier calls in the tail: they move
  // to the stage first, before any task can write the tail again (the last
  // chunk, if partial, fills the tail).
  if (!done.empty() && done.front() == c0 && first_token % C != 0)
    for (uint32_t h = 0; h < kvh; ++h)
      std::memcpy(stage + size_t{h} * seq.tail_elems_, seq.tail(layer, h), seq.tail_elems_ * sizeof(bf16));
  cpu_.parallel_for(size_t{c1 - c0 + 1} * kvh, 4, [&](size_t begin, size_t stop) {
    for (size_t w = begin; w < stop; ++w) {
      const uint32_t c = c0 + static_cast<uint32_t>(w / kvh), h = static_cast<uint32_t>(w % kvh);
      const uint64_t from = std::max<uint64_t>(first_token, uint64_t{c} * C);
      const uint64_t to = std::min<uint64_t>(end, (uint64_t{c} + 1) * C);
      const bool complete = to == (uint64_t{c} + 1) * C;
      bf16* dst = complete ? stage + (size_t{c - done.front()} * kvh + h) * seq.tail_elems_ : seq.tail(layer, h);
      for (uint64_t x = from; x < to; ++x) {
        const size_t src = (x - first_token) * kvrow + size_t{h} * d;
        std::memcpy(dst + (x % C) * d, k.data() + src, d * sizeof(bf16));
        std::memcpy(dst + size_t{C} * d + (x % C) * d, v.data() + src, d * sizeof(bf16));
      }
    }
  });
  KVT_ASSIGN_OR_RETURN(storage::HomeWrite write, begin_completed(seq, layer, done, stage));
  writing.start(std::move(write), engine_pool(cpu_), options_.trace, lane_write_);
  return Status::ok_status();
}

Status Executor::prefill(SequenceKv& seq, uint32_t layer, uint64_t first_token, uint32_t n, std::span<const bf16> q,
                         std::span<const bf16> k, std::span<const bf16> v, std::span<float> out) {
  const ModelShape& s = options_.shape;
  const SparsityPolicy& p = options_.policy;
  const uint32_t C = p.chunk_tokens, d = s.head_dim, kvh = s.kv_heads, qh = s.q_heads;
  if (layer >= s.layers)
    return invalid_argument("prefill: layer " + std::to_string(layer) + " of a model with " + std::to_string(s.layers));
  if (first_token != seq.layer_tokens_[layer])
    return invalid_argument("prefill: layer " + std::to_string(layer) + " holds " +
                            std::to_string(seq.layer_tokens_[layer]) + " tokens; the next block must start there, not at " +
                            std::to_string(first_token));
  if (n == 0) return invalid_argument("prefill: an empty query block");
  if (first_token + n > seq.max_tokens_)
    return out_of_range("prefill: tokens " + std::to_string(first_token) + "+" + std::to_string(n) +
                        " exceed the session's max_tokens=" + std::to_string(seq.max_tokens_));
  const size_t qrow = size_t{qh} * d, kvrow = size_t{kvh} * d;
  if (q.size() != n * qrow || k.size() != n * kvrow || v.size() != n * kvrow || (!out.empty() && out.size() != n * qrow))
    return invalid_argument("prefill: q/k/v/out hold " + std::to_string(q.size()) + "/" + std::to_string(k.size()) +
                            "/" + std::to_string(v.size()) + "/" + std::to_string(out.size()) + " elements; " +
                            std::to_string(n) + " tokens need " + std::to_string(n * qrow) + "/" +
                            std::to_string(n * kvrow) + "/" + std::to_string(n * kvrow) + "/" + std::to_string(n * qrow));
  const double t_start = wall_us();
  TraceRecorder* tr = options_.trace;

  // 1. Append into the tail blocks; the chunks the block completes get their
  // GPU copies and summaries now and go home behind steps 2 and 3.
  detail::WriteBehind writing;
  {
    TraceScope scope(tr, lane_cpu_, "prefill append + gpu copies + summaries");
    KVT_RETURN_IF_ERROR(stage_appended(seq, layer, first_token, n, k, v, writing));
    seq.layer_tokens_[layer] = first_token + n;
  }
  const double t_staged = wall_us();
  stats_.prefill_stage_us += t_staged - t_start;
  const uint64_t tokens = first_token + n;
  if (layer + 1 == s.layers) seq.store_->set_sequence_tokens(tokens);
  const bool tail_partial = tokens % C != 0;
  const uint32_t last_chunk = static_cast<uint32_t>((tokens - 1) / C);

  // 2. The chunks the block attends: sinks, the window back from its first
  // query to its last, and the top-k far chunks for the block's mean query.
  const ChunkRanges before = chunk_ranges(p, first_token == 0 ? 1 : first_token);
  const uint32_t sink_end = std::min(before.far_begin, last_chunk + 1);
  const uint32_t window_begin =
      std::max<uint32_t>(sink_end, first_token > p.window_tokens ? static_cast<uint32_t>((first_token - p.window_tokens) / C) : 0);
  std::vector<std::vector<uint32_t>> selected(kvh);
  // The GPU path stages q in pinned memory for its upload, in the same
  // parallel pass that averages it for scoring.
  const bool want_mean = window_begin > sink_end && p.topk_chunks > 0;
  bf16* q_staging = nullptr;
  if (cuda_ != nullptr) {
    KVT_RETURN_IF_ERROR(gpu_->host_q.reserve(q.size_bytes()));
    q_staging = reinterpret_cast<bf16*>(gpu_->host_q.data());
  }
  const std::span<const bf16> q_pinned(q_staging, q_staging != nullptr ? q.size() : 0);
  std::vector<bf16> qmean;
  {
    TraceScope scope(tr, lane_cpu_, "prefill query pass (mean, pinned staging)");
    qmean = query_pass(cpu_, q, n, static_cast<uint32_t>(qrow), q_staging, want_mean);
  }
  if (want_mean) {
    TraceScope scope(tr, lane_cpu_, "prefill scoring + top-k");
    const cpu::SummaryTable& table = seq.summaries_[layer];
    std::vector<float> scores(size_t{kvh} * table.blocks());
    cpu_.score(Bf16View<2>(qmean, {qh, d}), table, static_cast<float>(1.0 / std::sqrt(double(d))), score_rule_for(p.summary_kind),
               MutF32View<2>(scores, {kvh, table.blocks()}));
    cpu_.select(F32View<2>(scores, {kvh, table.blocks()}), p.topk_chunks, sink_end, window_begin, selected);
  }
  const double t_scored = wall_us();
  stats_.prefill_score_us += t_scored - t_staged;
  std::vector<std::vector<uint32_t>> full(kvh);  // full chunks attended, per head
  for (uint32_t h = 0; h < kvh; ++h) {
    for (uint32_t c = 0; c < sink_end; ++c) full[h].push_back(c);
    full[h].insert(full[h].end(), selected[h].begin(), selected[h].end());
    const uint32_t full_end = tail_partial ? last_chunk : last_chunk + 1;
    for (uint32_t c = window_begin; c < full_end; ++c)
      if (c >= sink_end) full[h].push_back(c);
  }
  // 3. Attention, in passes of as many blocks as the GPU tier has room for
  // (one pass when it is not starved); the passes' partial states merge
  // exactly, so any split of the attended blocks gives the same result.
  const float scale = static_cast<float>(1.0 / std::sqrt(double(d)));
  const uint32_t room = seq.store_->gpu_room();
  if (room <= kvh)
    return no_space("prefill: the gpu tier has room for " + std::to_string(room) +
                    " blocks of this context beyond its pinned sinks, windows and tails; raise --gpu-bytes");
  const size_t per_pass = room - kvh;  // a margin for this block's completed chunks
  size_t total = 0;
  for (const auto& l : full) total += l.size();
  const size_t passes = std::max<size_t>(1, (total + per_pass - 1) / per_pass);
  const bool keep = !out.empty() || passes > 1;
  // Each query's q heads are rows of one state: [n * q_heads] rows of head_dim.
  cpu::PartialState acc, pass_state;
  if (keep) {
    acc = cpu::PartialState::empty(n * qh, d);
    pass_state = cpu::PartialState::empty(n * qh, d);
  }
  size_t cursor_h = 0, cursor_j = 0;
  for (size_t pass = 0; pass < passes; ++pass) {
    std::vector<std::vector<uint32_t>> part(kvh);
    size_t taken = 0;
    while (cursor_h < kvh && taken < per_pass) {
      if (cursor_j >= full[cursor_h].size()) {
        ++cursor_h;
        cursor_j = 0;
        continue;
      }
      part[cursor_h].push_back(full[cursor_h][cursor_j++]);
      ++taken;
    }
    const bool with_tail = pass == 0 && tail_partial;
    std::vector<std::vector<storage::BlockPin>> pins;
    const double t_pin = wall_us();
    const storage::StoreStats pin0 = seq.store_->stats();
    KVT_RETURN_IF_ERROR(pin_on_gpu(seq, layer, part, pins, &writing));
    stats_.prefill_pin_us += wall_us() - t_pin;
    const storage::StoreStats pin1 = seq.store_->stats();
    stats_.prefill_fetch_nvme_reads += pin1.nvme_reads - pin0.nvme_reads;
    stats_.prefill_fetch_uploads += pin1.h2d_blocks - pin0.h2d_blocks;
    stats_.prefill_attended_blocks += taken;
    float* o_dst = keep ? pass_state.o.data() : nullptr;
    float* lse_dst = keep ? pass_state.lse.data() : nullptr;
    for (uint32_t h = 0; h < kvh; ++h) {
      uint64_t keys = 0;  // over the block's queries, for one q head of KV head h
      for (uint32_t c : part[h]) keys += prefill_keys(first_token, n, c, C);
      if (with_tail) keys += prefill_keys(first_token, n, last_chunk, C);
      stats_.prefill_attention_pairs += keys * (qh / kvh);
    }
    const double t_attend = wall_us();
    if (cuda_ != nullptr) {
      KVT_RETURN_IF_ERROR(gpu_->prefill(*this, seq, layer, first_token, n, q_pinned, part, pins, with_tail, last_chunk,
                                        scale, o_dst, lse_dst));
    } else {
      TraceScope scope(tr, lane_gpu_, "prefill attention (CPU stand-in)");
      // Each query: the full chunks before its own, its own chunk up to itself.
      cpu_.parallel_for(n, 16, [&](size_t begin, size_t end) {
        cpu::PartialState ps = cpu::PartialState::empty(qh, d);
        std::vector<std::vector<cpu::HostBlock>> lists(kvh);
        for (size_t i = begin; i < end; ++i) {
          const uint64_t pos = first_token + i;
          const uint32_t own = static_cast<uint32_t>(pos / C);
          for (uint32_t h = 0; h < kvh; ++h) {
            lists[h].clear();
            for (size_t j = 0; j < part[h].size(); ++j) {
              const uint32_t c = part[h][j];
              if (c > own) continue;
              const uint32_t valid = c == own ? static_cast<uint32_t>(pos % C) + 1 : C;
              lists[h].push_back({reinterpret_cast<const bf16*>(pins[h][j].data()), valid});
            }
            if (with_tail && own == last_chunk)
              lists[h].push_back({seq.tail(layer, h), static_cast<uint32_t>(pos % C) + 1});
          }
          cpu::attend_blocks(cpu_.isa(), Bf16View<2>(q.subspan(i * qrow, qrow), {qh, d}), lists, C, scale, ps);
          if (o_dst != nullptr) {
            std::copy(ps.o.begin(), ps.o.end(), o_dst + i * qrow);
            std::copy(ps.lse.begin(), ps.lse.end(), lse_dst + i * qh);
          }
        }
      });
    }
    stats_.prefill_attention_us += wall_us() - t_attend;
    if (keep) {
      const cpu::PartialState both[2] = {std::move(acc), pass_state};
      acc = cpu::merge_states(std::span<const cpu::PartialState>(both, 2));
    }
  }
  if (!out.empty()) std::copy(acc.o.begin(), acc.o.end(), out.begin());
  // The staged blocks are reused by the next call: their write ends here. A
  // failed write leaves its blocks unwritten, and later reads of them fail.
  const double t_join = wall_us();
  const Status landed = writing.join();
  stats_.home_write_wait_us += wall_us() - t_join;
  if (landed.ok()) {  // a failed write's time and blocks would skew the write rate they give
    stats_.prefill_home_write_us += writing.land_us();
    stats_.prefill_home_write_copy_us += writing.copy_us();
    stats_.prefill_home_write_file_us += writing.file_write_us();
    stats_.prefill_home_write_nvme_blocks += writing.nvme_blocks();
  }
  KVT_RETURN_IF_ERROR(landed.with_context("prefill of layer " + std::to_string(layer) + ", tokens " +
                                          std::to_string(first_token) + "+" + std::to_string(n)));
  // The GPU scorer's copy of the summaries this call completed.
  KVT_RETURN_IF_ERROR(sync_gpu_summaries(seq, layer, static_cast<uint32_t>((first_token + n) / C)));
  stats_.prefill_us += wall_us() - t_start;
  stats_.prefill_tokens += n;
  ++stats_.prefill_calls;
  return Status::ok_status();
}

// ---------------------------------------------------------------- verification

Result<cpu::FidelityReport> Executor::verify(SequenceKv& seq, uint32_t layer, std::span<const bf16> q,
                                             std::span<const float> out) {
  const ModelShape& s = options_.shape;
  const uint32_t C = options_.policy.chunk_tokens, d = s.head_dim, kvh = s.kv_heads;
  if (layer >= s.layers) return invalid_argument("verify: layer " + std::to_string(layer) + " is out of range");
  const uint64_t tokens = seq.layer_tokens_[layer];
  if (tokens == 0) return invalid_argument("verify: the layer holds no tokens");
  if (seq.last_attended_[layer].chunks.empty())
    return invalid_argument("verify: layer " + std::to_string(layer) + " has not decoded a step yet");
  if (q.size() != size_t{s.q_heads} * d || out.size() != size_t{s.q_heads} * d)
    return invalid_argument("verify: q and out must hold q_heads x head_dim elements");
  // Every token of the layer, read back through the tiers: full blocks from
  // their homes (host or NVMe, checksummed), the tail from the host copy.
  std::vector<bf16> kd(size_t{kvh} * tokens * d), vd(kd.size());
  const uint32_t chunks = static_cast<uint32_t>((tokens + C - 1) / C);
  const uint32_t full_chunks = static_cast<uint32_t>(tokens / C);
  const uint32_t batch = 32;
  for (uint32_t h = 0; h < kvh; ++h) {
    for (uint32_t c0 = 0; c0 < full_chunks; c0 += batch) {
      const uint32_t c1 = std::min(full_chunks, c0 + batch);
      std::vector<uint32_t> blocks;
      for (uint32_t c = c0; c < c1; ++c) blocks.push_back(seq.flat(layer, h, c));
      KVT_RETURN_IF_ERROR(seq.store_->wait(seq.store_->prefetch(blocks, Tier::kHost)));
      for (uint32_t c = c0; c < c1; ++c) {
        KVT_ASSIGN_OR_RETURN(storage::BlockPin pin, seq.store_->pin(seq.flat(layer, h, c), Tier::kHost));
        const bf16* src = reinterpret_cast<const bf16*>(pin.data());
        std::memcpy(&kd[(size_t{h} * tokens + uint64_t{c} * C) * d], src, size_t{C} * d * sizeof(bf16));
        std::memcpy(&vd[(size_t{h} * tokens + uint64_t{c} * C) * d], src + size_t{C} * d, size_t{C} * d * sizeof(bf16));
      }
    }
    if (full_chunks < chunks) {
      const uint32_t rows = static_cast<uint32_t>(tokens - uint64_t{full_chunks} * C);
      const bf16* t = seq.tail(layer, h);
      std::memcpy(&kd[(size_t{h} * tokens + uint64_t{full_chunks} * C) * d], t, size_t{rows} * d * sizeof(bf16));
      std::memcpy(&vd[(size_t{h} * tokens + uint64_t{full_chunks} * C) * d], t + size_t{C} * d,
                  size_t{rows} * d * sizeof(bf16));
    }
  }
  const cpu::ref::LayerKv kv{Bf16View<3>(kd, {kvh, tokens, d}), Bf16View<3>(vd, {kvh, tokens, d})};
  cpu::PartialState sparse = cpu::PartialState::empty(s.q_heads, d);
  std::copy(out.begin(), out.end(), sparse.o.begin());
  std::fill(sparse.lse.begin(), sparse.lse.end(), 0.f);
  return cpu::measure_fidelity(Bf16View<2>(q, {s.q_heads, d}), kv, seq.last_attended_[layer], C, sparse,
                               1.0 / std::sqrt(double(d)));
}

}  // namespace kvtier::scheduler
