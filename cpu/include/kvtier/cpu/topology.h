// Machine topology from hwloc: cores, NUMA nodes, caches and memory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kvtier/core/status.h"

namespace kvtier::cpu {

struct CacheLevel {
  uint32_t level = 0;        // 1, 2, 3 (L1 is the data cache)
  uint64_t size_bytes = 0;   // size of one instance
  uint32_t instances = 0;    // how many of them the machine has
};

struct NumaNode {
  uint32_t os_index = 0;
  uint64_t memory_bytes = 0;
  std::vector<uint32_t> cpus;  // OS indices of the PUs in this node
};

struct Topology {
  uint32_t packages = 0;
  uint32_t cores = 0;   // physical cores
  uint32_t pus = 0;     // hardware threads
  uint64_t memory_bytes = 0;
  std::vector<NumaNode> numa_nodes;
  std::vector<CacheLevel> caches;  // ascending level
};

// Loads the topology of this machine; fails only if hwloc cannot load it.
Result<Topology> load_topology();

// The OS index of the NUMA node nearest a PCI device ("0000:1a:00.0", as
// GpuDevice::pci_bus_id gives it): where its pinned host buffers belong.
// Empty when hwloc does not see the device or no single node is nearer.
Result<std::optional<uint32_t>> numa_node_of_pci(const std::string& pci_bus_id);

}  // namespace kvtier::cpu
