// CUDA devices present on this machine. Without a CUDA build, or without a
// driver or GPU, list_gpus() returns an unavailable Status that says why.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvtier/core/status.h"

namespace kvtier::gpu {

struct GpuDevice {
  int index = 0;
  std::string name;             // "NVIDIA H100 80GB HBM3"
  uint64_t memory_bytes = 0;    // total device memory
  uint32_t sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  std::string pci_bus_id;       // "0000:1a:00.0"
  // PCIe link as NVML (or sysfs) reports it; -1 when unknown. The current
  // generation can read low while the link idles, so the maximum is kept too.
  int pcie_gen_current = -1, pcie_gen_max = -1;
  int pcie_width_current = -1, pcie_width_max = -1;
};

// True when this build contains the CUDA backend.
bool built_with_cuda();

// Every CUDA device, or an error Status when this build has no CUDA backend,
// no driver is loaded or no device is present (the message says which). A
// runtime that reports zero devices without an error gives an empty list.
Result<std::vector<GpuDevice>> list_gpus();

// "13.0" style versions; empty when unknown.
std::string cuda_runtime_version();
std::string cuda_driver_version();

}  // namespace kvtier::gpu
