// CudaContext and Event: one device's streams, events and allocations, with
// every runtime call checked and turned into a Status that names it
// (DESIGN.md sections 6, 7).
#include "kvtier/gpu/cuda_context.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <utility>

#include "kvtier/core/log.h"
#include "cuda_check.h"

namespace kvtier::gpu {
namespace {

std::string gib_text(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

// The message a user acts on: what was asked, what the device has left.
Status out_of_device_memory(int device, const std::string& name, uint64_t bytes) {
  size_t free_bytes = 0, total_bytes = 0;
  const cudaError_t info = cudaMemGetInfo(&free_bytes, &total_bytes);
  if (info != cudaSuccess) {
    // Still out of memory (the caller degrades on that code), just without the free figure.
    (void)cudaGetLastError();
    return out_of_memory("out of GPU memory on cuda:" + std::to_string(device) + " (" + name + "): asked " +
                         std::to_string(bytes) + " bytes (" + gib_text(bytes) + "); free memory unknown (cudaMemGetInfo: " +
                         cuda_error_text(info) + "); lower the GPU budget");
  }
  return out_of_memory("out of GPU memory on cuda:" + std::to_string(device) + " (" + name + "): asked " +
                       std::to_string(bytes) + " bytes (" + gib_text(bytes) + "), " + std::to_string(free_bytes) +
                       " bytes (" + gib_text(free_bytes) + ") free of " + std::to_string(total_bytes) + " (" +
                       gib_text(total_bytes) + ") (cudaMemGetInfo); lower the GPU budget");
}

void free_device_memory(int device, void* p) {
  // cudaFree needs the allocating device current in this (maybe other) thread.
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaFree(p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    KVT_LOG_ERROR("cudaFree on device ", device, " failed: ", cuda_error_text(err));
  }
}

// cudaDeviceSynchronize with a message that says a fault belongs to earlier
// work: most kernel faults surface here, not at their launch, and are sticky.
Status wait_for_device(int device, const std::string& name, const char* why) {
  const cudaError_t err = cudaDeviceSynchronize();
  if (err == cudaSuccess) return Status::ok_status();
  (void)cudaGetLastError();
  return internal_error(std::string(why) + ": cudaDeviceSynchronize on cuda:" + std::to_string(device) + " (" +
                        name + ") reported an asynchronous fault of earlier work (a kernel or copy): " +
                        cuda_error_text(err) + "; rerun under compute-sanitizer to find the kernel");
}

Status check_copy_args(const char* what, const void* dst, const void* src, uint64_t bytes) {
  if (bytes != 0 && (dst == nullptr || src == nullptr)) {
    return invalid_argument(std::string(what) + " of " + std::to_string(bytes) + " bytes with a null pointer");
  }
  return Status::ok_status();
}

}  // namespace

// ---- Event ---------------------------------------------------------------

Event::~Event() {
  if (event_ != nullptr) (void)cudaEventDestroy(event_);
}

Event::Event(Event&& o) noexcept : event_(std::exchange(o.event_, nullptr)) {}

Event& Event::operator=(Event&& o) noexcept {
  // The moved-from event is destroyed with `o`.
  std::swap(event_, o.event_);
  return *this;
}

Result<Event> Event::create() {
  cudaEvent_t e = nullptr;
  // Timing stays enabled: the benches time kernels with these events.
  KVT_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDefault));
  return Event(e);
}

Status Event::record(cudaStream_t stream) {
  KVT_ASSERT(event_ != nullptr, "record of an empty Event");
  KVT_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_, stream));
  return Status::ok_status();
}

Status Event::wait_on(cudaStream_t stream) const {
  KVT_ASSERT(event_ != nullptr, "wait_on of an empty Event");
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, event_, 0));
  return Status::ok_status();
}

Status Event::synchronize() const {
  KVT_ASSERT(event_ != nullptr, "synchronize of an empty Event");
  KVT_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
  return Status::ok_status();
}

Result<float> Event::elapsed_ms(const Event& start, const Event& stop) {
  KVT_ASSERT(start.event_ != nullptr && stop.event_ != nullptr, "elapsed_ms of an empty Event");
  float ms = 0.f;
  KVT_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.event_, stop.event_));
  return ms;
}

// ---- CudaContext -----------------------------------------------------------

Result<std::unique_ptr<CudaContext>> CudaContext::create(int device) {
  KVT_RETURN_IF_ERROR(select_device(device));
  cudaDeviceProp prop{};
  KVT_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  // Built before the streams so that its destructor frees whichever of them
  // exist if a later call fails.
  std::unique_ptr<CudaContext> ctx(new CudaContext());
  ctx->device_ = device;
  ctx->name_ = prop.name;
  // Non-blocking: neither stream serializes with the legacy default stream.
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ctx->compute_, cudaStreamNonBlocking));
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ctx->copy_, cudaStreamNonBlocking));
  return Result<std::unique_ptr<CudaContext>>(std::move(ctx));
}

CudaContext::~CudaContext() {
  if (compute_ == nullptr && copy_ == nullptr) return;
  (void)cudaSetDevice(device_);
  if (compute_ != nullptr) (void)cudaStreamDestroy(compute_);
  if (copy_ != nullptr) (void)cudaStreamDestroy(copy_);
}

Result<DeviceMemory> CudaContext::allocate(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("CudaContext::allocate of 0 bytes");
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return out_of_device_memory(device_, name_, bytes);
  }
  if (err != cudaSuccess) return cuda_failure("cudaMalloc", err);
  return DeviceMemory(p, bytes, [device = device_](void* q) { free_device_memory(device, q); });
}

Status CudaContext::upload(void* device_dst, const void* host_src, uint64_t bytes) {
  KVT_RETURN_IF_ERROR(check_copy_args("upload", device_dst, host_src, bytes));
  if (bytes == 0) return Status::ok_status();
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  // Both streams are non-blocking, so a copy on either would not wait for
  // a kernel still writing or reading this memory on the other; draining the
  // device first makes these setup copies ordered after all earlier work.
  KVT_RETURN_IF_ERROR(wait_for_device(device_, name_, "upload"));
  KVT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, copy_));
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(copy_));
  return Status::ok_status();
}

Status CudaContext::download(void* host_dst, const void* device_src, uint64_t bytes) {
  KVT_RETURN_IF_ERROR(check_copy_args("download", host_dst, device_src, bytes));
  if (bytes == 0) return Status::ok_status();
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  KVT_RETURN_IF_ERROR(wait_for_device(device_, name_, "download"));
  KVT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, copy_));
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(copy_));
  return Status::ok_status();
}

Status CudaContext::memset(void* device_dst, int byte, uint64_t bytes) {
  if (bytes != 0 && device_dst == nullptr) return invalid_argument("memset of " + std::to_string(bytes) + " bytes at null");
  if (bytes == 0) return Status::ok_status();
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  KVT_RETURN_IF_ERROR(wait_for_device(device_, name_, "memset"));
  KVT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(device_dst, byte, bytes, copy_));
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(copy_));
  return Status::ok_status();
}

Status CudaContext::copy_async(void* dst, const void* src, uint64_t bytes, cudaStream_t stream) {
  KVT_RETURN_IF_ERROR(check_copy_args("copy_async", dst, src, bytes));
  if (bytes == 0) return Status::ok_status();
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  // cudaMemcpyDefault: unified addressing tells the direction from the pointers.
  KVT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
  return Status::ok_status();
}

Status CudaContext::synchronize(cudaStream_t stream) const {
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return Status::ok_status();
}

Status CudaContext::make_current() const {
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  return Status::ok_status();
}

Status CudaContext::synchronize_device() const {
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  return wait_for_device(device_, name_, "synchronize_device");
}

}  // namespace kvtier::gpu
