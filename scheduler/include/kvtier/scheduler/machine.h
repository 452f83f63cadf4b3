// What this machine offers kvtier: CPU features and topology, memory, GPUs,
// io_uring/O_DIRECT and library versions. The cost model and `kvtier
// calibrate` start from these facts; `kvtier info` prints them.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/cpu/cpu_features.h"
#include "kvtier/cpu/topology.h"
#include "kvtier/gpu/device_query.h"
#include "kvtier/storage/io_probe.h"

namespace kvtier::scheduler {

struct MachineFacts {
  cpu::CpuFeatures cpu;
  std::optional<cpu::Topology> topology;  // absent when hwloc failed (see topology_error)
  std::string topology_error;
  uint64_t memory_bytes = 0;              // physical RAM
  bool cuda_built = false;
  std::vector<gpu::GpuDevice> gpus;
  std::vector<std::optional<uint32_t>> gpu_numa_nodes;  // per gpu: nearest NUMA node, if one is nearer
  std::string gpu_error;                  // why gpus is empty, when it is
  storage::IoProbe io;
  std::string onednn_version, onetbb_version, hwloc_version, cuda_runtime_version, cuda_driver_version;
};

// Probes everything; io_uring and O_DIRECT are checked in `dir`.
MachineFacts probe_machine(const std::string& dir);

// The `kvtier info --json` document: top-level keys cpu, memory_bytes, gpus,
// io_uring {available, o_direct, error}, versions (and cuda).
nlohmann::json to_json(const MachineFacts& facts);

// A few lines for people.
std::string to_text(const MachineFacts& facts);

}  // namespace kvtier::scheduler
