// Build without nvcc: the same interface, reporting that this build has no
// GPU support so callers fall back to the CPU tier and can say why.
#include "kvtier/gpu/device_query.h"

namespace kvtier::gpu {

bool built_with_cuda() { return false; }

Result<std::vector<GpuDevice>> list_gpus() {
  return unavailable("this kvtier build has no CUDA backend (nvcc was not found at configure time)");
}

std::string cuda_runtime_version() { return {}; }
std::string cuda_driver_version() { return {}; }

}  // namespace kvtier::gpu
