// The CUDA compute backend. Without a CUDA build or a device, make_cuda_backend
// returns an unavailable Status saying why.
#pragma once

#include <memory>

#include "kvtier/core/compute_backend.h"

namespace kvtier::gpu {

Result<std::unique_ptr<ComputeBackend>> make_cuda_backend(int device = 0);

// How copy_to_device moves a batch of blocks (both are measured by the bench).
enum class BatchCopyMethod : uint8_t {
  kGatherKernel,  // one kernel reading host-mapped pinned memory with 16-byte loads
  kMemcpyBatch,   // cudaMemcpyBatchAsync: one API call, many copies
};
void set_batch_copy_method(ComputeBackend& cuda_backend, BatchCopyMethod method);

}  // namespace kvtier::gpu
