// The CPU compute backend: complete, so the whole pipeline (tiers included)
// runs and is tested without a GPU. Device memory is page-aligned host
// memory standing in for the GPU tier; copies are memcpy, run in parallel.
#pragma once

#include <memory>

#include "kvtier/core/compute_backend.h"

namespace kvtier::cpu {

// device_bytes_limit caps allocate_device() like a GPU's memory would
// (0: the machine's available RAM), so out-of-memory paths are testable.
std::unique_ptr<ComputeBackend> make_cpu_backend(uint64_t device_bytes_limit = 0);

}  // namespace kvtier::cpu
