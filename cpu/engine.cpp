// CpuEngine: the kernels of kernels.h run in parallel on a oneTBB task arena
// whose threads hwloc binds one per core of a NUMA node, plus prefill scoring
// through oneDNN (whose OpenMP team gets the same size and cores) or through
// the hand-written GEMM below.
//
// Two pools share the cores: oneTBB for everything but oneDNN, and libgomp,
// which Debian's oneDNN 2.6 is built against. Every engine call finishes its
// arena work before it returns and oneDNN runs only from
// prefill_scores_onednn, outside the arena, so with calls made one after the
// other the pools never compute at the same time; what overlaps is at most
// the short spin-wait each runtime does before its idle threads sleep (and
// keep_warm's spinners, which can outlive the call that took them by up to
// their limit).
#include "kvtier/cpu/engine.h"

#include <hwloc.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/blocked_range2d.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_scheduler_observer.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/core/log.h"
#include "x86/prefill_avx512.h"

namespace kvtier::cpu {
namespace {

// The spin-wait hint of keep_warm()'s spinners.
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// 512 blocks x 8 KV heads x 512 B of fp32 mean keys = 2 MiB per task: long
// enough to hide the task overhead, short enough that a 16K-block layer
// still makes 32 tasks for 16 threads.
constexpr uint32_t kScoreGrainBlocks = 512;
// attend() and far_field() cut the lists into about this many tasks per
// thread so that uneven lists still balance, but never into ranges shorter
// than kMinRangeItems: each task also writes and merges a whole partial state.
constexpr size_t kTasksPerThread = 4;
constexpr size_t kMinRangeItems = 8;
constexpr uint32_t kBuildGrainBlocks = 64;
// select() splits a head's candidates into pieces only when there are fewer
// heads than threads, and never into pieces under this many blocks (16 KiB
// of scores), so the merge of the pieces' top-k stays small next to them.
constexpr uint32_t kSelectMinPieceBlocks = 4096;
// Prefill tiles: 96 query rows (24 KiB of bf16 queries at head_dim 128) by
// 4 panels of 64 summaries (256 columns).
constexpr uint32_t kPrefillGrainRows = 96;
constexpr uint32_t kPrefillGrainPanels = 4;
constexpr uint32_t kPortableGrainCols = 512;

// ---------------------------------------------------------------- hwloc

struct TopologyDeleter {
  void operator()(hwloc_topology* t) const { hwloc_topology_destroy(t); }
};
using TopologyPtr = std::unique_ptr<hwloc_topology, TopologyDeleter>;
struct BitmapDeleter {
  void operator()(hwloc_bitmap_s* b) const { hwloc_bitmap_free(b); }
};
using BitmapPtr = std::unique_ptr<hwloc_bitmap_s, BitmapDeleter>;

Status hwloc_failure(const char* call) {
  return internal_error(std::string("cpu engine: ") + call + " failed: " + std::strerror(errno));
}

Result<TopologyPtr> open_topology() {
  hwloc_topology_t raw = nullptr;
  if (hwloc_topology_init(&raw) != 0) return hwloc_failure("hwloc_topology_init");
  TopologyPtr topo(raw);
  if (hwloc_topology_load(topo.get()) != 0) return hwloc_failure("hwloc_topology_load");
  return topo;
}

// "0-15" for a cpuset.
std::string cpuset_text(hwloc_const_bitmap_t set) {
  char* text = nullptr;
  if (hwloc_bitmap_list_asprintf(&text, set) < 0 || text == nullptr) return "?";
  std::string out(text);
  std::free(text);
  return out;
}

// The cores (each as the cpuset of its hardware threads) inside `set`; PUs
// when the machine hides its cores.
std::vector<BitmapPtr> cores_inside(hwloc_topology_t topo, hwloc_const_cpuset_t set) {
  std::vector<BitmapPtr> cores;
  for (hwloc_obj_type_t type : {HWLOC_OBJ_CORE, HWLOC_OBJ_PU}) {
    hwloc_obj_t obj = nullptr;
    while ((obj = hwloc_get_next_obj_inside_cpuset_by_type(topo, set, type, obj)) != nullptr)
      cores.emplace_back(hwloc_bitmap_dup(obj->cpuset));
    if (!cores.empty()) break;
  }
  return cores;
}

// The threads' cores: those of one NUMA node (bound), or a count of the
// machine's cores (unbound, no topology kept).
struct CoreSet {
  // Set only when binding; shared with every thread's ScopedBinding, which
  // can outlive the engine (a oneTBB worker that leaves the arena after the
  // observer stopped keeps its binding until the thread exits).
  std::shared_ptr<hwloc_topology> topo;
  std::vector<BitmapPtr> cores;  // one cpuset per core of the node
  uint32_t available = 0;        // cores threads may use
  std::string where;             // for describe()
};

Result<CoreSet> machine_cores() {
  KVT_ASSIGN_OR_RETURN(TopologyPtr topo, open_topology());
  CoreSet set;
  const hwloc_const_cpuset_t all = hwloc_topology_get_topology_cpuset(topo.get());
  set.available = static_cast<uint32_t>(cores_inside(topo.get(), all).size());
  set.where = "unbound (no NUMA node given; " + std::to_string(set.available) + " cores on the machine)";
  return set;
}

Result<CoreSet> node_cores(int numa_node) {
  KVT_ASSIGN_OR_RETURN(TopologyPtr topo, open_topology());
  const hwloc_obj_t node = hwloc_get_numanode_obj_by_os_index(topo.get(), static_cast<unsigned>(numa_node));
  if (node == nullptr)
    return invalid_argument("cpu engine: numa_node=" + std::to_string(numa_node) +
                            " does not exist (this machine's NUMA nodes: " +
                            cpuset_text(hwloc_topology_get_topology_nodeset(topo.get())) + ")");
  CoreSet set;
  set.cores = cores_inside(topo.get(), node->cpuset);
  if (set.cores.empty())
    return invalid_argument("cpu engine: NUMA node " + std::to_string(numa_node) +
                            " has memory but no cores; pass the node of the cores nearest it, or -1");
  set.available = static_cast<uint32_t>(set.cores.size());
  set.where =
      "bound one per core to NUMA node " + std::to_string(numa_node) + " (PUs " + cpuset_text(node->cpuset) + ")";
  set.topo = std::move(topo);
  return set;
}

// Binds the calling thread to `core` and puts its previous binding back when
// it goes out of scope: the threads we move are not all ours (the caller of
// an engine method, oneTBB workers shared with other arenas).
class ScopedBinding {
 public:
  ScopedBinding(std::shared_ptr<hwloc_topology> topo, hwloc_const_cpuset_t core)
      : topo_(std::move(topo)), saved_(hwloc_bitmap_alloc()) {
    if (hwloc_get_cpubind(topo_.get(), saved_.get(), HWLOC_CPUBIND_THREAD) != 0 ||
        hwloc_set_cpubind(topo_.get(), core, HWLOC_CPUBIND_THREAD) != 0) {
      warn_once();
      saved_.reset();
    }
  }
  ~ScopedBinding() {
    if (saved_ && hwloc_set_cpubind(topo_.get(), saved_.get(), HWLOC_CPUBIND_THREAD) != 0) warn_once();
  }
  ScopedBinding(const ScopedBinding&) = delete;
  ScopedBinding& operator=(const ScopedBinding&) = delete;

 private:
  // Binding is a placement hint: failing it (a cgroup that forbids a core)
  // costs speed, not correctness, so the work goes on unbound.
  static void warn_once() {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true))
      KVT_LOG_WARN("cpu engine: hwloc_set_cpubind failed (", std::strerror(errno), "); threads run unbound");
  }
  // Owned in part: a thread's binding may be undone at thread exit, after
  // the engine that made it is gone.
  std::shared_ptr<hwloc_topology> topo_;
  BitmapPtr saved_;
};

// Binds each thread that joins the arena to the core of its arena slot
// (slots are unique while occupied, and there are no more slots than cores),
// and restores the thread's binding when it leaves.
class CoreBinder final : public tbb::task_scheduler_observer {
 public:
  CoreBinder(tbb::task_arena& arena, const CoreSet& cores) : tbb::task_scheduler_observer(arena), cores_(cores) {
    observe(true);
  }
  ~CoreBinder() override { observe(false); }

  void on_scheduler_entry(bool) override {
    const int slot = tbb::this_task_arena::current_thread_index();
    if (slot < 0 || static_cast<size_t>(slot) >= cores_.cores.size()) return;
    binding() = std::make_unique<ScopedBinding>(cores_.topo, cores_.cores[static_cast<size_t>(slot)].get());
  }
  void on_scheduler_exit(bool) override { binding().reset(); }

 private:
  // One per thread: a thread is in at most one kvtier arena at a time.
  static std::unique_ptr<ScopedBinding>& binding() {
    thread_local std::unique_ptr<ScopedBinding> b;
    return b;
  }
  const CoreSet& cores_;
};

// ---------------------------------------------------------------- oneDNN

template <class T, auto Destroy>
struct DnnlDeleter {
  void operator()(T* p) const { Destroy(p); }
};
using DnnlEnginePtr = std::unique_ptr<dnnl_engine, DnnlDeleter<dnnl_engine, dnnl_engine_destroy>>;
using DnnlStreamPtr = std::unique_ptr<dnnl_stream, DnnlDeleter<dnnl_stream, dnnl_stream_destroy>>;
using DnnlPrimitivePtr = std::unique_ptr<dnnl_primitive, DnnlDeleter<dnnl_primitive, dnnl_primitive_destroy>>;
using DnnlPdPtr = std::unique_ptr<dnnl_primitive_desc, DnnlDeleter<dnnl_primitive_desc, dnnl_primitive_desc_destroy>>;
using DnnlMemoryPtr = std::unique_ptr<dnnl_memory, DnnlDeleter<dnnl_memory, dnnl_memory_destroy>>;

Status dnnl_check(dnnl_status_t status, const char* call) {
  if (status == dnnl_success) return Status::ok_status();
  return internal_error(std::string("oneDNN ") + call + " failed: " + dnnl_status2str(status));
}
// Calls a oneDNN C function and returns its failure as a Status naming it.
#define KVT_DNNL(fn, ...) KVT_RETURN_IF_ERROR(dnnl_check(fn(__VA_ARGS__), #fn))

struct Matmul {
  DnnlPrimitivePtr primitive;
  dnnl_memory_desc_t src{}, weights{}, dst{};
};

struct OneDnn {
  DnnlEnginePtr engine;
  DnnlStreamPtr stream;
  std::map<std::array<int64_t, 3>, Matmul> matmuls;  // by (M, N, K)
};

Status open_onednn(OneDnn& d) {
  if (d.stream) return Status::ok_status();
  dnnl_engine_t engine = nullptr;
  KVT_DNNL(dnnl_engine_create, &engine, dnnl_cpu, 0);
  d.engine.reset(engine);
  dnnl_stream_t stream = nullptr;
  KVT_DNNL(dnnl_stream_create, &stream, engine, static_cast<unsigned>(dnnl_stream_default_flags));
  d.stream.reset(stream);
  return Status::ok_status();
}

// scores [m][n] f32 = q [m][k] bf16 x B [k][n] bf16, where B is kmean [n][k]
// read through strides {1, k}: the transpose costs no copy.
Result<Matmul*> matmul_for(OneDnn& d, int64_t m, int64_t n, int64_t k) {
  const auto it = d.matmuls.find({m, n, k});
  if (it != d.matmuls.end()) return &it->second;
  Matmul mm;
  const dnnl_dims_t src_dims = {m, k}, src_strides = {k, 1};
  const dnnl_dims_t w_dims = {k, n}, w_strides = {1, k};
  const dnnl_dims_t dst_dims = {m, n}, dst_strides = {n, 1};
  KVT_DNNL(dnnl_memory_desc_init_by_strides, &mm.src, 2, src_dims, dnnl_bf16, src_strides);
  KVT_DNNL(dnnl_memory_desc_init_by_strides, &mm.weights, 2, w_dims, dnnl_bf16, w_strides);
  KVT_DNNL(dnnl_memory_desc_init_by_strides, &mm.dst, 2, dst_dims, dnnl_f32, dst_strides);
  dnnl_matmul_desc_t desc{};
  KVT_DNNL(dnnl_matmul_desc_init, &desc, &mm.src, &mm.weights, nullptr, &mm.dst);
  dnnl_primitive_desc_t pd_raw = nullptr;
  KVT_DNNL(dnnl_primitive_desc_create, &pd_raw, &desc, nullptr, d.engine.get(), nullptr);
  const DnnlPdPtr pd(pd_raw);
  dnnl_primitive_t primitive = nullptr;
  KVT_DNNL(dnnl_primitive_create, &primitive, pd.get());
  mm.primitive.reset(primitive);
  return &d.matmuls.emplace(std::array<int64_t, 3>{m, n, k}, std::move(mm)).first->second;
}

Result<DnnlMemoryPtr> wrap_memory(const OneDnn& d, const dnnl_memory_desc_t& desc, const void* data) {
  dnnl_memory_t mem = nullptr;
  // oneDNN takes a non-const handle for inputs and outputs alike; it only reads the inputs.
  KVT_DNNL(dnnl_memory_create, &mem, &desc, d.engine.get(), const_cast<void*>(data));
  return DnnlMemoryPtr(mem);
}

Status run_matmul(OneDnn& d, const Matmul& mm, const void* q, const void* kmean, float* scores) {
  KVT_ASSIGN_OR_RETURN(DnnlMemoryPtr src, wrap_memory(d, mm.src, q));
  KVT_ASSIGN_OR_RETURN(DnnlMemoryPtr weights, wrap_memory(d, mm.weights, kmean));
  KVT_ASSIGN_OR_RETURN(DnnlMemoryPtr dst, wrap_memory(d, mm.dst, scores));
  const dnnl_exec_arg_t args[] = {
      {DNNL_ARG_SRC, src.get()}, {DNNL_ARG_WEIGHTS, weights.get()}, {DNNL_ARG_DST, dst.get()}};
  KVT_DNNL(dnnl_primitive_execute, mm.primitive.get(), d.stream.get(), 3, args);
  KVT_DNNL(dnnl_stream_wait, d.stream.get());
  return Status::ok_status();
}

// ---------------------------------------------------------------- splitting

// One task of attend()/far_field(): items [begin, end) of KV head `head`'s list.
struct Range {
  uint32_t head;
  size_t begin, end;
};

// Cuts every head's list into near-equal ranges of at most `per` items, so
// that 8 heads x 512 blocks spread over 16 threads, and a single long list
// spreads over all of them too. Ranges come out in head order.
template <class Item>
std::vector<Range> split_lists(std::span<const std::vector<Item>> lists, unsigned threads) {
  size_t total = 0;
  for (const auto& l : lists) total += l.size();
  const size_t tasks = size_t{threads} * kTasksPerThread;
  const size_t per = std::max(kMinRangeItems, (total + tasks - 1) / tasks);
  std::vector<Range> ranges;
  for (uint32_t h = 0; h < lists.size(); ++h) {
    const size_t n = lists[h].size(), pieces = (n + per - 1) / per;
    for (size_t i = 0; i < pieces; ++i) ranges.push_back({h, n * i / pieces, n * (i + 1) / pieces});
  }
  return ranges;
}

// Per-task buffers of attend()/far_field(), kept between calls so that the
// big ones (a state of every q head per task) are allocated once. lists[t]
// has an entry per KV head, only the task's head non-empty: the kernels take
// lists for every head and write (0, -inf) for the empty ones, which costs a
// task q_heads x head_dim fp32 writes (16 KiB at 32 x 128) next to the 256 KiB
// or more of blocks it reads.
template <class Item>
struct SplitScratch {
  std::vector<std::vector<std::vector<Item>>> lists;
  std::vector<PartialState> states;
};

// Scratch for calls that may run at once (the executor's flow graph calls the
// engine from several tasks): each call takes an object from the pool and
// gives it back, so no two calls share one and the hot path allocates only
// when more calls overlap than ever before. The lock is never held across
// work (a thread waiting in a parallel_for may run another call's task).
template <class T>
class ScratchPool {
 public:
  class Lease {
   public:
    Lease(ScratchPool& pool, std::unique_ptr<T> item) : pool_(pool), item_(std::move(item)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { pool_.give_back(std::move(item_)); }
    T& operator*() const { return *item_; }

   private:
    ScratchPool& pool_;
    std::unique_ptr<T> item_;
  };
  Lease take() {
    std::lock_guard lock(mu_);
    if (free_.empty()) return Lease(*this, std::make_unique<T>());
    std::unique_ptr<T> item = std::move(free_.back());
    free_.pop_back();
    return Lease(*this, std::move(item));
  }

 private:
  void give_back(std::unique_ptr<T> item) {
    std::lock_guard lock(mu_);
    free_.push_back(std::move(item));
  }
  std::mutex mu_;
  std::vector<std::unique_ptr<T>> free_;
};

// Copies rows [first, first + count) of a state into `part`.
void copy_rows(const PartialState& from, uint32_t first, uint32_t count, PartialState& part) {
  if (part.heads != count || part.head_dim != from.head_dim) part = PartialState::empty(count, from.head_dim);
  const size_t dim = from.head_dim;
  std::copy_n(from.o.begin() + first * dim, count * dim, part.o.begin());
  std::copy_n(from.lse.begin() + first, count, part.lse.begin());
}

// out's q heads of KV head h = the exact merge of the tasks over h's ranges
// (tasks [first, last)); only h's group is merged, not every head of each task.
void merge_head(const std::vector<PartialState>& task_states, size_t first, size_t last, uint32_t h,
                uint32_t group, PartialState& out) {
  const size_t dim = out.head_dim;
  if (first == last) {
    std::fill_n(out.o.begin() + h * group * dim, group * dim, 0.f);
    std::fill_n(out.lse.begin() + h * group, group, -std::numeric_limits<float>::infinity());
    return;
  }
  std::vector<PartialState> parts(last - first);
  for (size_t t = first; t < last; ++t) copy_rows(task_states[t], h * group, group, parts[t - first]);
  const PartialState merged = merge_states<float>(parts);
  std::copy(merged.o.begin(), merged.o.end(), out.o.begin() + h * group * dim);
  std::copy(merged.lse.begin(), merged.lse.end(), out.lse.begin() + h * group);
}

}  // namespace

struct CpuEngine::Impl {
  unsigned threads = 1;
  Isa isa = Isa::kScalar;
  CoreSet cores;
  tbb::task_arena arena;
  std::unique_ptr<CoreBinder> binder;  // after arena and cores: destroyed before them
  ScratchPool<SplitScratch<HostBlock>> attend_scratch;
  ScratchPool<SplitScratch<uint32_t>> far_scratch;
  ScratchPool<std::vector<std::vector<uint32_t>>> select_scratch;  // select()'s per-piece top k
  OneDnn onednn;                       // opened on the first prefill_scores_onednn
  std::vector<uint32_t> packed_bf16;   // prefill_scores_own's summaries, VNNI pairs
  std::vector<float> packed_f32;       // the same, transposed fp32 for the portable path

  // Runs the tasks of one split call, then merges their states per KV head.
  template <class Item, class Kernel>
  void run_split(SplitScratch<Item>& s, uint32_t q_heads, uint32_t head_dim, std::span<const std::vector<Item>> lists,
                 const Kernel& kernel, PartialState& out);
};

template <class Item, class Kernel>
void CpuEngine::Impl::run_split(SplitScratch<Item>& s, uint32_t q_heads, uint32_t head_dim,
                                std::span<const std::vector<Item>> lists, const Kernel& kernel, PartialState& out) {
  const auto kv_heads = static_cast<uint32_t>(lists.size());
  KVT_ASSERT(kv_heads > 0 && q_heads % kv_heads == 0, "q_heads=", q_heads, " kv_heads=", kv_heads);
  const std::vector<Range> ranges = split_lists(lists, threads);
  if (s.lists.size() < ranges.size()) {
    s.lists.resize(ranges.size());
    s.states.resize(ranges.size());
  }
  if (out.heads != q_heads || out.head_dim != head_dim) out = PartialState::empty(q_heads, head_dim);
  arena.execute([&] {
    tbb::parallel_for(size_t{0}, ranges.size(), [&](size_t t) {
      const Range& r = ranges[t];
      std::vector<std::vector<Item>>& task_lists = s.lists[t];
      task_lists.resize(kv_heads);
      for (auto& l : task_lists) l.clear();
      task_lists[r.head].assign(lists[r.head].begin() + r.begin, lists[r.head].begin() + r.end);
      PartialState& st = s.states[t];
      if (st.heads != q_heads || st.head_dim != head_dim) st = PartialState::empty(q_heads, head_dim);
      kernel(std::span<const std::vector<Item>>(task_lists), st);
    });
    tbb::parallel_for(uint32_t{0}, kv_heads, [&](uint32_t h) {
      const auto head_of = [](const Range& r) { return r.head; };
      const auto first = std::ranges::lower_bound(ranges, h, {}, head_of) - ranges.begin();
      const auto last = std::ranges::upper_bound(ranges, h, {}, head_of) - ranges.begin();
      merge_head(s.states, static_cast<size_t>(first), static_cast<size_t>(last), h, q_heads / kv_heads, out);
    });
  });
}

CpuEngine::CpuEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CpuEngine::~CpuEngine() = default;

Result<std::unique_ptr<CpuEngine>> CpuEngine::create(const EngineOptions& options) {
  if (!options.isa_auto && !isa_available(options.isa))
    return unavailable("cpu engine: ISA " + std::string(isa_name(options.isa)) +
                       " is not available on this CPU (best here: " + std::string(isa_name(best_isa())) + ")");
  auto impl = std::make_unique<Impl>();
  KVT_ASSIGN_OR_RETURN(impl->cores, options.numa_node < 0 ? machine_cores() : node_cores(options.numa_node));
  const uint32_t available = impl->cores.available;
  if (options.threads > available)
    return invalid_argument("cpu engine: threads=" + std::to_string(options.threads) + " exceeds the " +
                            std::to_string(available) + " cores " +
                            (options.numa_node < 0 ? std::string("of this machine")
                                                   : "of NUMA node " + std::to_string(options.numa_node)));
  impl->threads = options.threads != 0 ? options.threads : std::max(1u, available);
  impl->isa = options.isa_auto ? best_isa() : options.isa;
  impl->arena.initialize(static_cast<int>(impl->threads));
  if (impl->cores.topo) impl->binder = std::make_unique<CoreBinder>(impl->arena, impl->cores);
  return std::unique_ptr<CpuEngine>(new CpuEngine(std::move(impl)));
}

unsigned CpuEngine::threads() const { return impl_->threads; }
Isa CpuEngine::isa() const { return impl_->isa; }

std::string CpuEngine::describe() const {
  const std::string n = std::to_string(impl_->threads);
  return n + " threads " + impl_->cores.where + ", " + std::string(isa_name(impl_->isa)) + " kernels, oneDNN: " + n +
         " OpenMP threads" + (impl_->cores.topo ? " on the same cores" : "") +
         ", run only while the TBB arena is idle";
}

void CpuEngine::score(Bf16View<2> q, const SummaryTable& table, float scale, ScoreRule rule, MutF32View<2> scores) {
  // Each task covers every KV head of its block range: score_summaries splits
  // by blocks, and 16K blocks make enough tasks without splitting heads.
  impl_->arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<uint32_t>(0, table.blocks(), kScoreGrainBlocks), [&](const auto& r) {
      score_summaries(impl_->isa, q, table, scale, rule, r.begin(), r.end(), scores);
    });
  });
}

namespace {

// How many pieces each head's [far_begin, far_end) is cut into: enough that
// heads x pieces covers the threads (8 KV heads leave half of 16 threads idle).
uint32_t select_pieces(uint32_t kv_heads, uint32_t candidates, uint32_t k, unsigned threads) {
  if (kv_heads == 0 || kv_heads >= threads) return 1;
  const uint32_t wanted = (threads + kv_heads - 1) / kv_heads;
  const uint32_t fit = candidates / std::max(kSelectMinPieceBlocks, 4 * k);
  return std::max(1u, std::min(wanted, fit));
}

// Head h's top k from the top k of each of its pieces: the union holds every
// block of the overall top k (fewer than k blocks of its own piece outrank
// it). Ranking the union with select_topk itself, over a compact row in
// ascending block order, keeps its order and tie-break exactly.
void merge_pieces(F32View<2> scores, uint32_t h, uint32_t k, std::span<const std::vector<uint32_t>> pieces,
                  std::vector<uint32_t>& out) {
  std::vector<uint32_t> blocks;
  for (const auto& p : pieces) blocks.insert(blocks.end(), p.begin(), p.end());
  std::sort(blocks.begin(), blocks.end());
  std::vector<float> row(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) row[i] = scores(h, blocks[i]);
  const auto n = static_cast<uint32_t>(blocks.size());
  select_topk(F32View<2>(row, {1, n}), 0, k, 0, n, out);
  for (uint32_t& b : out) b = blocks[b];
}

}  // namespace

void CpuEngine::select(F32View<2> scores, uint32_t k, uint32_t far_begin, uint32_t far_end,
                       std::vector<std::vector<uint32_t>>& out) {
  KVT_ASSERT(far_begin <= far_end && far_end <= scores.extent(1), "far blocks [", far_begin, ", ", far_end, ") of ",
             scores.extent(1));
  const auto kv_heads = static_cast<uint32_t>(scores.extent(0));
  const uint32_t pieces = select_pieces(kv_heads, far_end - far_begin, k, impl_->threads);
  out.resize(kv_heads);
  if (pieces == 1) {
    impl_->arena.execute([&] {
      tbb::parallel_for(uint32_t{0}, kv_heads,
                        [&](uint32_t h) { select_topk(scores, h, k, far_begin, far_end, out[h]); });
    });
    return;
  }
  const auto lease = impl_->select_scratch.take();
  std::vector<std::vector<uint32_t>>& part = *lease;
  part.resize(size_t{kv_heads} * pieces);
  const uint64_t n = far_end - far_begin;
  impl_->arena.execute([&] {
    tbb::parallel_for(uint32_t{0}, kv_heads * pieces, [&](uint32_t t) {
      const uint32_t h = t / pieces, i = t % pieces;
      select_topk(scores, h, k, far_begin + static_cast<uint32_t>(n * i / pieces),
                  far_begin + static_cast<uint32_t>(n * (i + 1) / pieces), part[t]);
    });
    tbb::parallel_for(uint32_t{0}, kv_heads, [&](uint32_t h) {
      merge_pieces(scores, h, k, std::span(part).subspan(size_t{h} * pieces, pieces), out[h]);
    });
  });
}

void CpuEngine::attend(Bf16View<2> q, std::span<const std::vector<HostBlock>> blocks, uint32_t chunk_tokens,
                       float scale, PartialState& out) {
  const Isa isa = impl_->isa;
  const auto kernel = [&](std::span<const std::vector<HostBlock>> lists, PartialState& st) {
    attend_blocks(isa, q, lists, chunk_tokens, scale, st);
  };
  const auto lease = impl_->attend_scratch.take();
  impl_->run_split(*lease, static_cast<uint32_t>(q.extent(0)), static_cast<uint32_t>(q.extent(1)),
                   blocks, kernel, out);
}

void CpuEngine::far_field(Bf16View<2> q, const SummaryTable& table, std::span<const std::vector<uint32_t>> blocks,
                          float scale, PartialState& out) {
  const Isa isa = impl_->isa;
  const auto kernel = [&](std::span<const std::vector<uint32_t>> lists, PartialState& st) {
    cpu::far_field(isa, q, table, lists, scale, st);
  };
  const auto lease = impl_->far_scratch.take();
  impl_->run_split(*lease, static_cast<uint32_t>(q.extent(0)), static_cast<uint32_t>(q.extent(1)),
                   blocks, kernel, out);
}

void CpuEngine::build_summaries(std::span<const std::vector<HostBlock>> blocks, uint32_t chunk_tokens,
                                SummaryTable& table) {
  KVT_ASSERT(blocks.size() == table.kv_heads(), "lists for ", blocks.size(), " KV heads, table has ", table.kv_heads());
  uint32_t longest = 0;
  for (const auto& l : blocks) {
    KVT_ASSERT(l.size() <= table.blocks(), l.size(), " blocks for a table of ", table.blocks());
    longest = std::max(longest, static_cast<uint32_t>(l.size()));
  }
  const tbb::blocked_range2d<uint32_t> all(0, table.kv_heads(), 1, 0, longest, kBuildGrainBlocks);
  impl_->arena.execute([&] {
    tbb::parallel_for(all, [&](const tbb::blocked_range2d<uint32_t>& r) {
      for (uint32_t h = r.rows().begin(); h < r.rows().end(); ++h)
        for (uint32_t b = r.cols().begin(); b < std::min<size_t>(r.cols().end(), blocks[h].size()); ++b)
          build_summary(impl_->isa, blocks[h][b], chunk_tokens, table, h, b);
    });
  });
}

void CpuEngine::run(const std::function<void()>& fn) { impl_->arena.execute(fn); }

CpuEngine::WarmHold& CpuEngine::WarmHold::operator=(WarmHold&& o) noexcept {
  if (this != &o) {
    release();
    stop_ = std::move(o.stop_);
  }
  return *this;
}

void CpuEngine::WarmHold::release() {
  if (stop_ != nullptr) stop_->store(true, std::memory_order_release);
  stop_.reset();
}

CpuEngine::WarmHold CpuEngine::keep_warm(std::chrono::microseconds limit) {
  if (impl_->threads < 2) return WarmHold();
  auto stop = std::make_shared<std::atomic<bool>>(false);
  const auto until = std::chrono::steady_clock::now() + limit;
  // One spinner per worker slot (the arena reserves one slot for a caller).
  // A spinner that starts after the release returns at once.
  for (unsigned i = 0; i + 1 < impl_->threads; ++i)
    impl_->arena.enqueue([stop, until] {
      while (!stop->load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until) {
        for (int k = 0; k < 16; ++k) spin_pause();
        std::this_thread::yield();  // a runnable I/O or driver thread bound here gets the core
      }
    });
  return WarmHold(std::move(stop));
}

void CpuEngine::parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  impl_->arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, std::max<size_t>(grain, 1)),
                      [&](const tbb::blocked_range<size_t>& r) { fn(r.begin(), r.end()); });
  });
}

// ---------------------------------------------------------------- prefill

namespace {

struct GemmShape {
  uint32_t m, n, k;
};

Result<GemmShape> prefill_shape(Bf16View<2> q, Bf16View<2> kmean, MutF32View<2> scores) {
  const GemmShape s{static_cast<uint32_t>(q.extent(0)), static_cast<uint32_t>(kmean.extent(0)),
                    static_cast<uint32_t>(q.extent(1))};
  if (kmean.extent(1) != s.k || scores.extent(0) != s.m || scores.extent(1) != s.n || s.k == 0)
    return invalid_argument("prefill scoring: q [" + std::to_string(s.m) + "][" + std::to_string(s.k) + "], kmean [" +
                            std::to_string(s.n) + "][" + std::to_string(kmean.extent(1)) + "], scores [" +
                            std::to_string(scores.extent(0)) + "][" + std::to_string(scores.extent(1)) +
                            "]: need kmean [n][k] and scores [m][n] with k > 0");
  return s;
}

// Sizes the calling thread's OpenMP team to the engine's threads (oneDNN
// sizes its parallel regions from omp_get_max_threads()) and, on a node,
// binds the team's threads one per core, the caller's binding restored after.
class OmpTeam {
 public:
  OmpTeam(unsigned threads, const CoreSet& cores) : saved_threads_(omp_get_max_threads()) {
    omp_set_num_threads(static_cast<int>(threads));
    if (!cores.topo) return;
    caller_ = std::make_unique<ScopedBinding>(cores.topo, cores.cores[0].get());
    // libgomp keeps a team's threads for the next region of the same size
    // from this thread, so the region oneDNN opens next runs on these.
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      // A failed bind only costs placement, as for the TBB workers; the team's
      // threads stay bound, which suits the next prefill call too.
      const auto i = static_cast<size_t>(omp_get_thread_num());
      if (i > 0) (void)hwloc_set_cpubind(cores.topo.get(), cores.cores[i].get(), HWLOC_CPUBIND_THREAD);
    }
  }
  ~OmpTeam() { omp_set_num_threads(saved_threads_); }
  OmpTeam(const OmpTeam&) = delete;
  OmpTeam& operator=(const OmpTeam&) = delete;

 private:
  int saved_threads_;
  std::unique_ptr<ScopedBinding> caller_;
};

// Panel `panel` of kmean [n][k] bf16 as VNNI pairs (x86::PrefillArgs::packed).
void pack_panel(const bf16* kmean, const GemmShape& s, uint32_t panel, uint32_t* packed) {
  constexpr uint32_t kColumns = x86::kPrefillPanelColumns;
  const uint32_t pairs = (s.k + 1) / 2;
  uint32_t* out = packed + size_t{panel} * pairs * kColumns;
  for (uint32_t j = 0; j < kColumns; ++j) {
    const uint32_t n = panel * kColumns + j;
    const bf16* row = n < s.n ? kmean + size_t{n} * s.k : nullptr;
    for (uint32_t p = 0; p < pairs; ++p) {
      uint32_t pair = 0;
      if (row != nullptr) pair = row[2 * p].bits | (2 * p + 1 < s.k ? uint32_t{row[2 * p + 1].bits} << 16 : 0u);
      out[size_t{p} * kColumns + j] = pair;
    }
  }
}

}  // namespace

Status CpuEngine::prefill_scores_onednn(Bf16View<2> q, Bf16View<2> kmean, MutF32View<2> scores) {
  KVT_ASSIGN_OR_RETURN(const GemmShape s, prefill_shape(q, kmean, scores));
  if (s.m == 0 || s.n == 0) return Status::ok_status();
  Impl& im = *impl_;
  const OmpTeam team(im.threads, im.cores);
  const auto context = "prefill_scores_onednn M=" + std::to_string(s.m) + " N=" + std::to_string(s.n) +
                       " K=" + std::to_string(s.k);
  KVT_RETURN_IF_ERROR(open_onednn(im.onednn).with_context(context));
  Result<Matmul*> mm = matmul_for(im.onednn, s.m, s.n, s.k);
  if (!mm.ok()) return mm.status().with_context(context);
  return run_matmul(im.onednn, **mm, q.data().data(), kmean.data().data(), scores.data().data()).with_context(context);
}

namespace {

// The AVX512_BF16 path: summaries packed once per call, then register-blocked
// tiles of vdpbf16ps (cpu/x86/prefill_avx512.cpp) over (rows x 64-column panels).
void prefill_vnni(CpuEngine::Impl& im, const GemmShape& s, const bf16* q, const bf16* kmean, float* scores) {
  const uint32_t panels = (s.n + x86::kPrefillPanelColumns - 1) / x86::kPrefillPanelColumns, pairs = (s.k + 1) / 2;
  im.packed_bf16.resize(size_t{panels} * pairs * x86::kPrefillPanelColumns);
  const x86::PrefillArgs args{q, s.k, im.packed_bf16.data(), pairs, scores, s.n};
  im.arena.execute([&] {
    tbb::parallel_for(uint32_t{0}, panels, [&](uint32_t p) { pack_panel(kmean, s, p, im.packed_bf16.data()); });
    const tbb::blocked_range2d<uint32_t> all(0, s.m, kPrefillGrainRows, 0, panels, kPrefillGrainPanels);
    tbb::parallel_for(all, [&](const tbb::blocked_range2d<uint32_t>& r) {
      x86::prefill_tile_avx512bf16(args, r.rows().begin(), r.rows().end(), r.cols().begin(), r.cols().end());
    });
  });
}

// Any other ISA: kmean transposed to fp32 [k][n] once, then per query row a
// multiply-add of each k's row into the output row, a loop the compiler
// vectorises for the baseline ISA. A fallback; the VNNI path is the fast one.
void prefill_portable(CpuEngine::Impl& im, const GemmShape& s, const bf16* q, const bf16* kmean, float* scores) {
  im.packed_f32.resize(size_t{s.k} * s.n);
  float* bt = im.packed_f32.data();
  im.arena.execute([&] {
    tbb::parallel_for(uint32_t{0}, s.n, [&](uint32_t n) {
      for (uint32_t d = 0; d < s.k; ++d) bt[size_t{d} * s.n + n] = kmean[size_t{n} * s.k + d].to_float();
    });
    const tbb::blocked_range2d<uint32_t> all(0, s.m, 16, 0, s.n, kPortableGrainCols);
    tbb::parallel_for(all, [&](const tbb::blocked_range2d<uint32_t>& r) {
      const uint32_t n0 = r.cols().begin(), n1 = r.cols().end();
      for (uint32_t m = r.rows().begin(); m < r.rows().end(); ++m) {
        float* out = scores + size_t{m} * s.n;
        std::fill(out + n0, out + n1, 0.f);
        for (uint32_t d = 0; d < s.k; ++d) {
          const float a = q[size_t{m} * s.k + d].to_float();
          const float* row = bt + size_t{d} * s.n;
          for (uint32_t n = n0; n < n1; ++n) out[n] += a * row[n];
        }
      }
    });
  });
}

}  // namespace

void CpuEngine::prefill_scores_own(Bf16View<2> q, Bf16View<2> kmean, MutF32View<2> scores) {
  const Result<GemmShape> s = prefill_shape(q, kmean, scores);
  KVT_ASSERT(s.ok(), s.status().message());
  if (s->m == 0 || s->n == 0) return;
  if (impl_->isa == Isa::kAvx512Bf16)
    prefill_vnni(*impl_, *s, q.data().data(), kmean.data().data(), scores.data().data());
  else
    prefill_portable(*impl_, *s, q.data().data(), kmean.data().data(), scores.data().data());
}

}  // namespace kvtier::cpu
