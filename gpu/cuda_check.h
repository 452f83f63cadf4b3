// Private to gpu/: turning CUDA runtime failures into Status values that name
// the call (DESIGN.md section 7).
#pragma once

#include <cuda_runtime.h>

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "kvtier/core/status.h"

namespace kvtier::gpu {

inline std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// A failed runtime call as a Status. Also clears the thread's last-error slot,
// so that a handled failure is not reported again by the cudaGetLastError
// that follows the next kernel launch.
inline Status cuda_failure(const char* call, cudaError_t err) {
  (void)cudaGetLastError();
  return internal_error(std::string(call) + " failed: " + cuda_error_text(err));
}

// invalid_argument naming the first null pointer among `fields` ("what: k is
// null; pass a device pointer"), or ok.
inline Status require_pointers(std::string_view what, std::initializer_list<std::pair<const char*, const void*>> fields) {
  for (const auto& [name, pointer] : fields)
    if (pointer == nullptr) return invalid_argument(std::string(what) + ": " + name + " is null; pass a device pointer");
  return Status::ok_status();
}

// Makes `device` current. No driver, no device or a device index past the
// last is "unavailable" (a capability this machine lacks, not a bug).
inline Status select_device(int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return unavailable("no usable CUDA device: cudaGetDeviceCount failed: " + cuda_error_text(err));
  }
  if (device < 0 || device >= count)
    return unavailable("CUDA device " + std::to_string(device) + " does not exist (this machine has " +
                       std::to_string(count) + ")");
  const cudaError_t set = cudaSetDevice(device);
  if (set != cudaSuccess) return cuda_failure("cudaSetDevice", set);
  return Status::ok_status();
}

}  // namespace kvtier::gpu

// Returns a Status naming the call when a CUDA runtime call fails.
#define KVT_CUDA_RETURN_IF_ERROR(call)                                                          \
  do {                                                                                          \
    const cudaError_t kvt_cuda_err_ = (call);                                                   \
    if (kvt_cuda_err_ != cudaSuccess) return ::kvtier::gpu::cuda_failure(#call, kvt_cuda_err_); \
  } while (0)

// After a kernel launch: the launch error (bad configuration, no device) as a
// Status naming the kernel.
#define KVT_CUDA_RETURN_IF_LAUNCH_FAILED(kernel_name)                                           \
  do {                                                                                          \
    const cudaError_t kvt_cuda_err_ = cudaGetLastError();                                       \
    if (kvt_cuda_err_ != cudaSuccess)                                                           \
      return ::kvtier::internal_error(std::string("launch of ") + (kernel_name) +               \
                                      " failed: " + ::kvtier::gpu::cuda_error_text(kvt_cuda_err_)); \
  } while (0)
