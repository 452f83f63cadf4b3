#include "kvtier/cpu/topology.h"

#include <hwloc.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

namespace kvtier::cpu {
namespace {

struct TopologyDeleter {
  void operator()(hwloc_topology* t) const { hwloc_topology_destroy(t); }
};
// Owns an initialised hwloc topology; destroyed on every return path.
using TopologyPtr = std::unique_ptr<hwloc_topology, TopologyDeleter>;

// hwloc reports failures as -1 with errno set.
Status hwloc_failure(const char* call) {
  return internal_error(std::string(call) + " failed: " + std::strerror(errno));
}

Result<TopologyPtr> open_topology(bool with_pci = false) {
  hwloc_topology_t raw = nullptr;
  if (hwloc_topology_init(&raw) != 0) return hwloc_failure("hwloc_topology_init");
  TopologyPtr topo(raw);
  // PCI devices are filtered out by default; finding a GPU's node needs them.
  if (with_pci) hwloc_topology_set_io_types_filter(topo.get(), HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
  if (hwloc_topology_load(topo.get()) != 0) return hwloc_failure("hwloc_topology_load");
  return topo;
}

uint32_t count(hwloc_topology_t topo, hwloc_obj_type_t type) {
  const int n = hwloc_get_nbobjs_by_type(topo, type);
  return n > 0 ? static_cast<uint32_t>(n) : 0;
}

std::vector<NumaNode> numa_nodes(hwloc_topology_t topo) {
  std::vector<NumaNode> nodes;
  hwloc_obj_t obj = nullptr;
  while ((obj = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_NUMANODE, obj)) != nullptr) {
    NumaNode node;
    node.os_index = obj->os_index;
    node.memory_bytes = obj->attr->numanode.local_memory;
    // A NUMA node's cpuset is finite, so first/next ends with -1.
    const hwloc_const_cpuset_t set = obj->cpuset;
    for (int pu = set ? hwloc_bitmap_first(set) : -1; pu != -1; pu = hwloc_bitmap_next(set, pu)) {
      node.cpus.push_back(static_cast<uint32_t>(pu));
    }
    nodes.push_back(std::move(node));
  }
  return nodes;
}

// L1 counts only data (or unified) caches: hwloc files instruction caches
// under their own L1ICACHE type, which kvtier's blocking never targets.
std::vector<CacheLevel> caches(hwloc_topology_t topo) {
  constexpr hwloc_obj_type_t kTypes[] = {HWLOC_OBJ_L1CACHE, HWLOC_OBJ_L2CACHE, HWLOC_OBJ_L3CACHE};
  std::vector<CacheLevel> out;
  for (uint32_t i = 0; i < 3; ++i) {
    const hwloc_obj_t first = hwloc_get_obj_by_type(topo, kTypes[i], 0);
    if (first == nullptr || first->attr->cache.size == 0) continue;
    out.push_back({i + 1, first->attr->cache.size, count(topo, kTypes[i])});
  }
  return out;
}

uint64_t kernel_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_bytes = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_bytes <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_bytes);
}

// The NUMA nodes' local memory is the first source, then the root's total.
// Either can undercount: some virtual machines expose no node memory, and
// in others the per-node counters miss hot-added memory (one virtual
// machine reported 4.6 GiB in node0 of its 23.5 GiB). Neither source counts
// memory the kernel does not have, so the largest of them and the kernel's
// own page count is the machine's memory.
uint64_t memory_bytes(hwloc_topology_t topo, const std::vector<NumaNode>& nodes) {
  uint64_t sum = 0;
  for (const NumaNode& node : nodes) sum += node.memory_bytes;
  const uint64_t hwloc_bytes = sum > 0 ? sum : hwloc_get_root_obj(topo)->total_memory;
  return std::max(hwloc_bytes, kernel_memory_bytes());
}

}  // namespace

Result<Topology> load_topology() {
  KVT_ASSIGN_OR_RETURN(TopologyPtr topo, open_topology());
  Topology t;
  t.packages = count(topo.get(), HWLOC_OBJ_PACKAGE);
  t.cores = count(topo.get(), HWLOC_OBJ_CORE);
  t.pus = count(topo.get(), HWLOC_OBJ_PU);
  // A machine that hides its core structure still runs one thread per PU.
  if (t.cores == 0) t.cores = t.pus;
  t.numa_nodes = numa_nodes(topo.get());
  t.caches = caches(topo.get());
  t.memory_bytes = memory_bytes(topo.get(), t.numa_nodes);
  return t;
}

Result<std::optional<uint32_t>> numa_node_of_pci(const std::string& pci_bus_id) {
  KVT_ASSIGN_OR_RETURN(TopologyPtr topo, open_topology(true));
  const hwloc_obj_t dev = hwloc_get_pcidev_by_busidstring(topo.get(), pci_bus_id.c_str());
  if (dev == nullptr) return std::optional<uint32_t>();
  // The device's nearest non-I/O ancestor (a package or the machine) carries
  // the nodeset of the memory close to it.
  const hwloc_obj_t near = hwloc_get_non_io_ancestor_obj(topo.get(), dev);
  if (near == nullptr || near->nodeset == nullptr || hwloc_bitmap_iszero(near->nodeset))
    return std::optional<uint32_t>();
  // A machine-wide ancestor spans every node: then no node is nearer.
  if (hwloc_bitmap_weight(near->nodeset) != 1) return std::optional<uint32_t>();
  return std::optional<uint32_t>(static_cast<uint32_t>(hwloc_bitmap_first(near->nodeset)));
}

}  // namespace kvtier::cpu
