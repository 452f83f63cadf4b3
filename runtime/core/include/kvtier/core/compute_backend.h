// ComputeBackend: what the runtime needs from a compute device, implemented
// by the CPU backend (cpu/, complete, host memory stands in for device
// memory) and the CUDA backend (gpu/). Backends say what they support;
// callers ask rather than #ifdef (DESIGN.md section 6).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <utility>

#include "kvtier/core/status.h"

namespace kvtier {

// Memory owned by a backend's device (device memory for CUDA, host memory for
// the CPU backend). Move-only; released by the backend that made it.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(void* data, uint64_t bytes, std::function<void(void*)> release)
      : data_(data), bytes_(bytes), release_(std::move(release)) {}
  DeviceMemory(DeviceMemory&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), release_(std::move(o.release_)) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    std::swap(release_, o.release_);
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    if (data_ != nullptr && release_) release_(data_);
  }

  std::byte* data() const { return static_cast<std::byte*>(data_); }
  uint64_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  uint64_t bytes_ = 0;
  std::function<void(void*)> release_;
};

// One block copy: `bytes` from src to dst. For copies to the device, src is
// host memory (pinned through pin_host for full speed) and dst device memory;
// for copies to the host, the reverse.
struct BlockCopy {
  const std::byte* src = nullptr;
  std::byte* dst = nullptr;
  uint64_t bytes = 0;
};

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;

  // "cpu" or "cuda:0 (NVIDIA H200)".
  virtual std::string_view name() const = 0;
  // True when device memory is ordinary host memory (the CPU backend).
  virtual bool device_is_host() const = 0;

  // Device memory of `bytes`; out of memory is an error naming the bytes asked and free.
  virtual Result<DeviceMemory> allocate_device(uint64_t bytes) = 0;
  // Free and total device memory in bytes, as the device reports them.
  virtual Result<std::pair<uint64_t, uint64_t>> device_memory_info() = 0;

  // Page-locks [p, p + bytes) so the device can DMA from it (cudaHostRegister
  // for CUDA; mlock for the CPU backend, where failure is reported, not fatal).
  virtual Status pin_host(void* p, uint64_t bytes) = 0;
  virtual void unpin_host(void* p, uint64_t bytes) = 0;

  // Many block copies in one call (one kernel or grouped copies, never one
  // API call per block on the CUDA backend); returns when all have landed.
  virtual Status copy_to_device(std::span<const BlockCopy> copies) = 0;
  virtual Status copy_to_host(std::span<const BlockCopy> copies) = 0;
};

}  // namespace kvtier
