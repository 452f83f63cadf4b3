// The host tier's memory: one anonymous mapping, placed and faulted in at
// start so that a machine short of memory fails now, not mid-decode.
#include "kvtier/storage/host_arena.h"

#include <hwloc.h>
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#include "kvtier/core/sysinfo.h"
#include "kvtier/core/log.h"
#include "kvtier/core/sizes.h"

namespace kvtier::storage {
namespace {

constexpr uint64_t kPageBytes = 4096;
constexpr uint64_t kHugePageBytes = uint64_t{2} << 20;

Status validate(const HostArenaOptions& o) {
  if (o.slot_bytes == 0 || o.slot_bytes % kPageBytes != 0) {
    return invalid_argument("host arena: slot_bytes=" + std::to_string(o.slot_bytes) +
                            " must be a non-zero multiple of 4 KiB (the block size rounded up)");
  }
  if (o.budget_bytes < o.slot_bytes) {
    return invalid_argument("host_bytes=" + format_bytes(o.budget_bytes) + " is smaller than one block slot of " +
                            format_bytes(o.slot_bytes) + "; raise --host-bytes to at least " +
                            format_bytes(o.slot_bytes));
  }
  const uint64_t available = mem_available_bytes();
  // Without /proc/meminfo there is nothing to compare with; mmap and the
  // first touch below still fail at start if the memory is not there.
  if (available != 0 && o.budget_bytes > available) {
    return out_of_memory("host_bytes=" + format_bytes(o.budget_bytes) + " exceeds the " + format_bytes(available) +
                         " this machine has available; lower --host-bytes");
  }
  if (o.budget_bytes / o.slot_bytes > std::numeric_limits<uint32_t>::max()) {
    return invalid_argument("host_bytes=" + format_bytes(o.budget_bytes) +
                            " makes more than 2^32-1 slots; use larger blocks or lower --host-bytes");
  }
  return Status::ok_status();
}

// An anonymous mapping, unmapped on destruction unless released.
class Mapping {
 public:
  Mapping(std::byte* base, uint64_t bytes) : base_(base), bytes_(bytes) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base_ != nullptr) munmap(base_, bytes_);
  }
  std::byte* base() const { return base_; }
  std::byte* release() { return std::exchange(base_, nullptr); }

 private:
  std::byte* base_;
  uint64_t bytes_;
};

std::byte* map_anonymous(uint64_t bytes, int extra_flags) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
}

// Maps `bytes`, preferring reserved 2 MiB huge pages, then transparent ones.
// Fewer TLB entries matter when the CPU walks gigabytes of blocks per step.
Result<std::unique_ptr<Mapping>> map_memory(uint64_t bytes, bool try_huge_pages, std::string& pages_text) {
  if (try_huge_pages && bytes % kHugePageBytes == 0) {
    if (std::byte* p = map_anonymous(bytes, MAP_HUGETLB)) {
      pages_text = "2 MiB huge pages";
      return std::make_unique<Mapping>(p, bytes);
    }
  }
  std::byte* p = map_anonymous(bytes, 0);
  if (p == nullptr) {
    const int err = errno;
    return out_of_memory("host arena: mmap of " + format_bytes(bytes) + " failed: " + std::strerror(err) +
                         "; lower --host-bytes");
  }
  pages_text = "4 KiB pages";
  if (try_huge_pages && madvise(p, bytes, MADV_HUGEPAGE) == 0) pages_text = "transparent huge pages advised";
  return std::make_unique<Mapping>(p, bytes);
}

struct TopologyDeleter {
  void operator()(hwloc_topology* t) const { hwloc_topology_destroy(t); }
};
using Topology = std::unique_ptr<hwloc_topology, TopologyDeleter>;

Topology load_topology() {
  hwloc_topology_t t = nullptr;
  if (hwloc_topology_init(&t) != 0) return nullptr;
  Topology topology(t);
  if (hwloc_topology_load(t) != 0) return nullptr;
  return topology;
}

// Binds [base, base + bytes) to NUMA node `node` before the first touch, so
// pages are born there. A node that does not exist is the user's error; a
// binding the kernel refuses is reported in the text and not fatal.
Status bind_numa(std::byte* base, uint64_t bytes, int node, std::string& numa_text) {
  if (node < 0) {
    numa_text = "no NUMA binding";
    return Status::ok_status();
  }
  const Topology topology = load_topology();
  if (!topology) {
    numa_text = "NUMA node " + std::to_string(node) + " requested, but hwloc could not load the topology";
    return Status::ok_status();
  }
  hwloc_obj_t obj = hwloc_get_numanode_obj_by_os_index(topology.get(), static_cast<unsigned>(node));
  if (obj == nullptr) {
    const int nodes = hwloc_get_nbobjs_by_type(topology.get(), HWLOC_OBJ_NUMANODE);
    return invalid_argument("host arena: numa_node=" + std::to_string(node) + " does not exist; this machine has " +
                            std::to_string(nodes) + " NUMA node(s)");
  }
  if (hwloc_set_area_membind(topology.get(), base, bytes, obj->nodeset, HWLOC_MEMBIND_BIND,
                             HWLOC_MEMBIND_BYNODESET) != 0) {
    const int err = errno;
    numa_text = "NUMA node " + std::to_string(node) + " requested, binding failed: " + std::strerror(err);
    KVT_LOG_WARN("host arena: ", numa_text);
    return Status::ok_status();
  }
  numa_text = "NUMA node " + std::to_string(node);
  return Status::ok_status();
}

// Writes every page once so the kernel commits the memory now. Several
// threads, because one core faults in only a few GB/s.
void first_touch(std::byte* base, uint64_t bytes) {
  constexpr uint64_t kBytesPerThreadMin = uint64_t{256} << 20;
  const uint64_t threads = std::clamp<uint64_t>(bytes / kBytesPerThreadMin, 1,
                                                std::clamp(std::thread::hardware_concurrency(), 1u, 8u));
  const uint64_t chunk = (bytes / threads + kPageBytes - 1) / kPageBytes * kPageBytes;
  std::vector<std::jthread> workers;
  for (uint64_t begin = 0; begin < bytes; begin += chunk) {
    workers.emplace_back([=] { std::memset(base + begin, 0, std::min(chunk, bytes - begin)); });
  }
}

}  // namespace

Result<std::unique_ptr<HostArena>> HostArena::create(ComputeBackend& backend, const HostArenaOptions& options) {
  KVT_RETURN_IF_ERROR(validate(options));
  const uint64_t slots = options.budget_bytes / options.slot_bytes;
  const uint64_t bytes = slots * options.slot_bytes;
  std::string pages_text, numa_text;
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<Mapping> mapping, map_memory(bytes, options.try_huge_pages, pages_text));
  KVT_RETURN_IF_ERROR(bind_numa(mapping->base(), bytes, options.numa_node, numa_text));
  first_touch(mapping->base(), bytes);

  std::unique_ptr<HostArena> arena(
      new HostArena(backend, mapping->release(), bytes, options.slot_bytes, static_cast<uint32_t>(slots)));
  std::string pin_text = "pinned (" + std::string(backend.name()) + ")";
  if (Status st = backend.pin_host(arena->base_, bytes); st.ok()) {
    arena->pinned_ = true;
  } else {
    // Unpinned memory still works: copies go through the driver's staging
    // buffers (CUDA) or are plain memcpy (CPU), only slower.
    KVT_LOG_WARN("host arena of ", format_bytes(bytes), " runs unpinned: ", st.message());
    pin_text = "not pinned (" + st.message() + ")";
  }
  arena->description_ = format_bytes(bytes) + " in " + std::to_string(slots) + " slots of " +
                        format_bytes(options.slot_bytes) + ": " + pin_text + ", " + pages_text + ", " + numa_text;
  return arena;
}

HostArena::HostArena(ComputeBackend& backend, std::byte* base, uint64_t bytes, uint64_t slot_bytes, uint32_t slots)
    : backend_(backend), base_(base), bytes_(bytes), slot_bytes_(slot_bytes), slots_(slots) {}

HostArena::~HostArena() {
  if (pinned_) backend_.unpin_host(base_, bytes_);
  munmap(base_, bytes_);
}

std::byte* HostArena::slot_data(uint32_t slot) const {
  KVT_ASSERT(slot < capacity(), "host slot ", slot, " is out of range (capacity ", capacity(), ")");
  return base_ + uint64_t{slot} * slot_bytes_;
}

}  // namespace kvtier::storage
