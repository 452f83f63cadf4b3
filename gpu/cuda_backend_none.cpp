// Build without CUDA: the interface stays, and says why there is no GPU.
#include "kvtier/gpu/cuda_backend.h"

namespace kvtier::gpu {

Result<std::unique_ptr<ComputeBackend>> make_cuda_backend(int device) {
  return unavailable("this kvtier build has no CUDA backend (nvcc was not found or KVTIER_ENABLE_CUDA=OFF), so "
                     "CUDA device " + std::to_string(device) + " cannot be used; rebuild with the CUDA toolkit");
}

// No CUDA backend can exist in this build, so there is nothing to configure.
void set_batch_copy_method(ComputeBackend& /*cuda_backend*/, BatchCopyMethod /*method*/) {}

}  // namespace kvtier::gpu
