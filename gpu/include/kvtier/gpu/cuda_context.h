// Streams, events and device buffers of one CUDA device, every call checked
// and turned into a Status naming it (DESIGN.md sections 6, 7). The scheduler
// runs a step on a compute stream and a copy stream ordered by events.
// Without a CUDA build or a device, create() returns an unavailable Status.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "kvtier/core/compute_backend.h"
#include "kvtier/core/status.h"
#include "kvtier/gpu/kernels.h"  // cudaStream_t

struct CUevent_st;
using cudaEvent_t = CUevent_st*;

namespace kvtier::gpu {

// A CUDA event (timing enabled). Move-only.
class Event {
 public:
  Event() = default;
  ~Event();
  Event(Event&& o) noexcept;
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  static Result<Event> create();
  Status record(cudaStream_t stream);
  // Makes `stream` wait for this event (no host blocking).
  Status wait_on(cudaStream_t stream) const;
  Status synchronize() const;
  // Milliseconds between two recorded, completed events.
  static Result<float> elapsed_ms(const Event& start, const Event& stop);
  cudaEvent_t get() const { return event_; }

 private:
  explicit Event(cudaEvent_t e) : event_(e) {}
  cudaEvent_t event_ = nullptr;
};

// One device: its name, a compute stream and a copy stream (non-blocking),
// and device allocations that report out-of-memory with the bytes asked and
// the bytes free.
class CudaContext {
 public:
  static Result<std::unique_ptr<CudaContext>> create(int device = 0);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  const std::string& name() const { return name_; }
  cudaStream_t compute_stream() const { return compute_; }
  cudaStream_t copy_stream() const { return copy_; }

  // Device memory (cudaMalloc); "out of GPU memory: asked N bytes, M free of T".
  Result<DeviceMemory> allocate(uint64_t bytes);
  // Blocking copies for setup and tests (host memory need not be pinned).
  Status upload(void* device_dst, const void* host_src, uint64_t bytes);
  Status download(void* host_dst, const void* device_src, uint64_t bytes);
  Status memset(void* device_dst, int byte, uint64_t bytes);
  // Asynchronous copy on `stream` in any direction (cudaMemcpyDefault); full
  // speed from host memory needs it pinned.
  Status copy_async(void* dst, const void* src, uint64_t bytes, cudaStream_t stream);
  Status synchronize(cudaStream_t stream) const;
  // Makes this device the calling thread's current one (cudaSetDevice): kernel
  // launches from a thread other than the creator's need it.
  Status make_current() const;
  // Waits for all work on the device; reports an asynchronous kernel fault.
  Status synchronize_device() const;

 private:
  CudaContext() = default;
  int device_ = 0;
  std::string name_;
  cudaStream_t compute_ = nullptr;
  cudaStream_t copy_ = nullptr;
};

}  // namespace kvtier::gpu
