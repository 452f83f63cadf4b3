// The CUDA backend: device memory through cudaMalloc, host memory pinned and
// mapped through cudaHostRegister, and block batches moved either by one
// gather kernel that reads host-mapped memory with 16-byte loads or by one
// cudaMemcpyBatchAsync call (DESIGN.md section 3: batching is what makes
// 32 KiB blocks reach PCIe speed).
#include "kvtier/gpu/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "kvtier/core/log.h"
#include "kvtier/core/sizes.h"
#include "cuda_check.h"

namespace kvtier::gpu {
namespace {

// ---- The gather kernel ---------------------------------------------------

// One contiguous piece of a block copy, in 16-byte vectors.
struct CopyDescriptor {
  const uint4* src;
  uint4* dst;
  uint32_t vectors;
};

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
// Large copies are cut into pieces of this size so that one 32 MiB copy
// spreads over many SMs instead of crawling through one thread block.
constexpr uint64_t kPieceBytes = 32 * 1024;
constexpr uint32_t kMaxBlocks = 1u << 16;
// Unpinned copies in one call from which the slow path is worth a warning: a
// few (a decode step's completed tail blocks, cached on the GPU from the
// caller's buffer) cost little one by one; a batch this large is a setup to fix.
constexpr size_t kUnpinnedWarnCopies = 64;

// Moves `count` vectors with the block's threads. Each thread issues kUnroll
// loads before its first store: a read of mapped host memory crosses PCIe and
// takes a microsecond or more, so only many loads in flight reach the link's
// bandwidth.
__device__ __forceinline__ void copy_vectors(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                             uint32_t count) {
  uint32_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < count; i += kUnroll * kThreads) {
    uint4 v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) v[k] = src[i + k * kThreads];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) dst[i + k * kThreads] = v[k];
  }
  for (; i < count; i += kThreads) dst[i] = src[i];
}

// One thread block per descriptor, grid-striding when there are more
// descriptors than blocks.
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const CopyDescriptor* __restrict__ descriptors, uint32_t count) {
  for (uint32_t c = blockIdx.x; c < count; c += gridDim.x) {
    const CopyDescriptor d = descriptors[c];
    copy_vectors(d.src, d.dst, d.vectors);
  }
}

Status launch_gather(const CopyDescriptor* descriptors_device, uint32_t count, cudaStream_t stream) {
  KVT_ASSERT(count > 0, "gather launch with no descriptors");
  const uint32_t blocks = std::min(count, kMaxBlocks);
  gather_kernel<<<blocks, kThreads, 0, stream>>>(descriptors_device, count);
  KVT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

// ---- RAII for CUDA resources ---------------------------------------------

struct StreamDestroy {
  void operator()(cudaStream_t s) const { (void)cudaStreamDestroy(s); }
};
using StreamHandle = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;

struct DeviceFree {
  void operator()(void* p) const { (void)cudaFree(p); }
};
struct PinnedHostFree {
  void operator()(void* p) const { (void)cudaFreeHost(p); }
};

// Grow-only descriptor storage: a pinned host staging array (so the upload
// is a true async copy) and its device twin that the kernel reads. Callers
// synchronize the stream before the next reserve(), so nothing in flight
// still reads a buffer that is replaced.
class DescriptorBuffers {
 public:
  Status reserve(size_t count) {
    if (count <= capacity_) return Status::ok_status();
    const size_t grown = std::max(count, 2 * capacity_);
    void* host = nullptr;
    void* device = nullptr;
    KVT_CUDA_RETURN_IF_ERROR(cudaMallocHost(&host, grown * sizeof(CopyDescriptor)));
    host_.reset(host);
    KVT_CUDA_RETURN_IF_ERROR(cudaMalloc(&device, grown * sizeof(CopyDescriptor)));
    device_.reset(device);
    capacity_ = grown;
    return Status::ok_status();
  }
  CopyDescriptor* host() const { return static_cast<CopyDescriptor*>(host_.get()); }
  const CopyDescriptor* device() const { return static_cast<const CopyDescriptor*>(device_.get()); }

 private:
  size_t capacity_ = 0;
  std::unique_ptr<void, PinnedHostFree> host_;
  std::unique_ptr<void, DeviceFree> device_;
};

void release_device_memory(int device, void* p) {
  // cudaFree needs the allocating device current in this (maybe other) thread.
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaFree(p);
  if (err != cudaSuccess) KVT_LOG_ERROR("cudaFree on device ", device, " failed: ", cuda_error_text(err));
}

std::string bytes_text(uint64_t bytes) { return format_bytes(bytes) + " (" + std::to_string(bytes) + " bytes)"; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- The backend ---------------------------------------------------------

class CudaBackend final : public ComputeBackend {
 public:
  CudaBackend(int device, std::string name, bool host_pointer_is_device_pointer, StreamHandle stream)
      : device_(device), name_(std::move(name)),
        host_pointer_is_device_pointer_(host_pointer_is_device_pointer), stream_(std::move(stream)) {}
  ~CudaBackend() override;

  std::string_view name() const override { return name_; }
  bool device_is_host() const override { return false; }
  Result<DeviceMemory> allocate_device(uint64_t bytes) override;
  Result<std::pair<uint64_t, uint64_t>> device_memory_info() override;
  Status pin_host(void* p, uint64_t bytes) override;
  void unpin_host(void* p, uint64_t bytes) override;
  Status copy_to_device(std::span<const BlockCopy> copies) override { return copy(copies, Direction::kToDevice); }
  Status copy_to_host(std::span<const BlockCopy> copies) override { return copy(copies, Direction::kToHost); }

  void set_method(BatchCopyMethod method) { method_.store(method, std::memory_order_relaxed); }

 private:
  enum class Direction { kToDevice, kToHost };
  struct Pin {
    uint64_t bytes;
    std::byte* device_ptr;  // the device's address of the first byte
  };

  Status copy(std::span<const BlockCopy> copies, Direction dir);
  void split(std::span<const BlockCopy> copies, Direction dir);
  std::byte* mapped_locked(const std::byte* p, uint64_t bytes) const;
  Status enqueue(Direction dir);
  Status enqueue_gather(Direction dir);
  size_t fill_descriptors(Direction dir);
  Status enqueue_memcpy_batch();
  Status enqueue_unpinned(Direction dir);
  Status device_out_of_memory(uint64_t bytes);

  const int device_;
  const std::string name_;
  // When false (some IOMMU setups), the kernel must use the address that
  // cudaHostGetDevicePointer gives instead of the host pointer.
  const bool host_pointer_is_device_pointer_;
  const StreamHandle stream_;
  std::atomic<BatchCopyMethod> method_{BatchCopyMethod::kGatherKernel};
  std::atomic<bool> warned_unpinned_{false};

  mutable std::mutex pins_mu_;
  std::map<uintptr_t, Pin> pins_;  // by host address

  // One stream and one descriptor buffer: batches run one at a time. The
  // vectors below are scratch reused by every batch, guarded by copy_mu_.
  std::mutex copy_mu_;
  DescriptorBuffers descriptors_;
  std::vector<BlockCopy> pinned_, unpinned_;
  std::vector<std::byte*> pinned_mapped_;  // device address of each pinned_ copy's host side
  std::vector<void*> batch_dsts_, batch_srcs_;
  std::vector<size_t> batch_sizes_;
};

CudaBackend::~CudaBackend() {
  std::lock_guard lock(pins_mu_);
  if (!pins_.empty()) KVT_LOG_WARN(name_, ": ", pins_.size(), " host registration(s) still pinned at shutdown");
  (void)cudaSetDevice(device_);
  for (const auto& [host, pin] : pins_) (void)cudaHostUnregister(reinterpret_cast<void*>(host));
}

Result<DeviceMemory> CudaBackend::allocate_device(uint64_t bytes) {
  if (bytes == 0) return invalid_argument(name_ + ": allocate_device of 0 bytes");
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return device_out_of_memory(bytes);
  }
  if (err != cudaSuccess) return cuda_failure("cudaMalloc", err);
  return DeviceMemory(p, bytes, [device = device_](void* q) { release_device_memory(device, q); });
}

Status CudaBackend::device_out_of_memory(uint64_t bytes) {
  size_t free_bytes = 0, total_bytes = 0;
  KVT_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  return out_of_memory(name_ + ": cannot allocate " + bytes_text(bytes) + " of device memory: " +
                       format_bytes(free_bytes) + " free of " + format_bytes(total_bytes) +
                       "; use a smaller GPU budget");
}

Result<std::pair<uint64_t, uint64_t>> CudaBackend::device_memory_info() {
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  size_t free_bytes = 0, total_bytes = 0;
  KVT_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  return std::pair<uint64_t, uint64_t>{free_bytes, total_bytes};
}

Status CudaBackend::pin_host(void* p, uint64_t bytes) {
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  // Mapped: the gather kernel reads the memory directly; portable: every
  // context may DMA from it.
  const cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return internal_error("pinning " + format_bytes(bytes) + " of host memory for " + name_ +
                          ": cudaHostRegister failed: " + cuda_error_text(err));
  }
  void* device_ptr = p;
  if (!host_pointer_is_device_pointer_) {
    const cudaError_t map_err = cudaHostGetDevicePointer(&device_ptr, p, 0);
    if (map_err != cudaSuccess) {
      (void)cudaHostUnregister(p);
      return cuda_failure("cudaHostGetDevicePointer", map_err);
    }
  }
  std::lock_guard lock(pins_mu_);
  pins_[reinterpret_cast<uintptr_t>(p)] = Pin{bytes, static_cast<std::byte*>(device_ptr)};
  return Status::ok_status();
}

void CudaBackend::unpin_host(void* p, uint64_t bytes) {
  {
    std::lock_guard lock(pins_mu_);
    const auto it = pins_.find(reinterpret_cast<uintptr_t>(p));
    KVT_ASSERT(it != pins_.end() && it->second.bytes == bytes, "unpin_host of ", p, " (", bytes,
               " bytes), which pin_host did not pin");
    pins_.erase(it);
  }
  cudaError_t err = cudaSetDevice(device_);
  if (err == cudaSuccess) err = cudaHostUnregister(p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    KVT_LOG_ERROR(name_, ": cudaHostUnregister failed: ", cuda_error_text(err));
  }
}

// The device address of host range [p, p + bytes) when one pin_host call
// covers all of it, else nullptr. Needs pins_mu_.
std::byte* CudaBackend::mapped_locked(const std::byte* p, uint64_t bytes) const {
  const auto host = reinterpret_cast<uintptr_t>(p);
  auto it = pins_.upper_bound(host);
  if (it == pins_.begin()) return nullptr;
  --it;
  const uint64_t offset = host - it->first;
  if (offset >= it->second.bytes || bytes > it->second.bytes - offset) return nullptr;
  return it->second.device_ptr + offset;
}

// Sorts the batch into copies whose host side is pinned (fast path) and the
// rest (one cudaMemcpyAsync each).
void CudaBackend::split(std::span<const BlockCopy> copies, Direction dir) {
  pinned_.clear();
  pinned_mapped_.clear();
  unpinned_.clear();
  std::lock_guard lock(pins_mu_);
  for (const BlockCopy& c : copies) {
    KVT_ASSERT(c.bytes == 0 || (c.src != nullptr && c.dst != nullptr), "null pointer in a ", c.bytes,
               "-byte block copy");
    if (c.bytes == 0) continue;
    const std::byte* host = dir == Direction::kToDevice ? c.src : c.dst;
    if (std::byte* mapped = mapped_locked(host, c.bytes)) {
      pinned_.push_back(c);
      pinned_mapped_.push_back(mapped);
    } else {
      unpinned_.push_back(c);
    }
  }
}

Status CudaBackend::copy(std::span<const BlockCopy> copies, Direction dir) {
  if (copies.empty()) return Status::ok_status();
  std::lock_guard lock(copy_mu_);
  KVT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  split(copies, dir);
  const Status st = enqueue(dir);
  // Wait even after a failed enqueue: work already queued may still read the
  // descriptor buffers or the caller's memory.
  const cudaError_t sync = cudaStreamSynchronize(stream_.get());
  if (!st.ok()) return st;
  if (sync != cudaSuccess) return cuda_failure("cudaStreamSynchronize", sync);
  return Status::ok_status();
}

Status CudaBackend::enqueue(Direction dir) {
  const bool gather = method_.load(std::memory_order_relaxed) == BatchCopyMethod::kGatherKernel;
  KVT_RETURN_IF_ERROR(gather ? enqueue_gather(dir) : enqueue_memcpy_batch());
  return enqueue_unpinned(dir);
}

// Writes the descriptors of pinned_ into the host staging array, cutting
// copies into kPieceBytes pieces; returns how many it wrote.
size_t CudaBackend::fill_descriptors(Direction dir) {
  CopyDescriptor* out = descriptors_.host();
  size_t n = 0;
  for (size_t i = 0; i < pinned_.size(); ++i) {
    const bool to_device = dir == Direction::kToDevice;
    const std::byte* src = to_device ? pinned_mapped_[i] : pinned_[i].src;
    std::byte* dst = to_device ? pinned_[i].dst : pinned_mapped_[i];
    for (uint64_t off = 0; off < pinned_[i].bytes; off += kPieceBytes) {
      const uint64_t piece = std::min(kPieceBytes, pinned_[i].bytes - off);
      out[n++] = CopyDescriptor{reinterpret_cast<const uint4*>(src + off), reinterpret_cast<uint4*>(dst + off),
                                static_cast<uint32_t>(piece / 16)};
    }
  }
  return n;
}

Status CudaBackend::enqueue_gather(Direction dir) {
  if (pinned_.empty()) return Status::ok_status();
  size_t pieces = 0;
  for (size_t i = 0; i < pinned_.size(); ++i) {
    const BlockCopy& c = pinned_[i];
    if (!aligned16(c.src) || !aligned16(c.dst) || c.bytes % 16 != 0) {
      return invalid_argument(name_ + ": block copy of " + std::to_string(c.bytes) +
                              " bytes is not 16-byte aligned in address or size; the gather kernel moves 16-byte "
                              "vectors (arena slots are 4 KiB aligned, so this is a caller's pointer)");
    }
    pieces += (c.bytes + kPieceBytes - 1) / kPieceBytes;
  }
  KVT_ASSERT(pieces <= UINT32_MAX, "gather batch of ", pieces, " pieces");
  KVT_RETURN_IF_ERROR(descriptors_.reserve(pieces));
  const size_t n = fill_descriptors(dir);
  KVT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(const_cast<CopyDescriptor*>(descriptors_.device()), descriptors_.host(),
                                           n * sizeof(CopyDescriptor), cudaMemcpyHostToDevice, stream_.get()));
  return launch_gather(descriptors_.device(), static_cast<uint32_t>(n), stream_.get());
}

Status CudaBackend::enqueue_memcpy_batch() {
  if (pinned_.empty()) return Status::ok_status();
#if CUDART_VERSION >= 12080
  batch_dsts_.clear();
  batch_srcs_.clear();
  batch_sizes_.clear();
  for (const BlockCopy& c : pinned_) {
    batch_dsts_.push_back(c.dst);
    batch_srcs_.push_back(const_cast<std::byte*>(c.src));  // CUDA 12.x declares the sources non-const
    batch_sizes_.push_back(c.bytes);
  }
  // One attribute set for the whole batch: sources are read in stream order.
  cudaMemcpyAttributes attrs{};
  attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attrs.flags = cudaMemcpyFlagDefault;
  size_t attrs_index = 0;
#if CUDART_VERSION >= 13000
  KVT_CUDA_RETURN_IF_ERROR(cudaMemcpyBatchAsync(batch_dsts_.data(), batch_srcs_.data(), batch_sizes_.data(),
                                                pinned_.size(), &attrs, &attrs_index, 1, stream_.get()));
#else
  size_t fail_index = 0;
  KVT_CUDA_RETURN_IF_ERROR(cudaMemcpyBatchAsync(batch_dsts_.data(), batch_srcs_.data(), batch_sizes_.data(),
                                                pinned_.size(), &attrs, &attrs_index, 1, &fail_index,
                                                stream_.get()));
#endif
  return Status::ok_status();
#else
  return unsupported(name_ + ": cudaMemcpyBatchAsync needs CUDA 12.8 or newer; use the gather kernel");
#endif
}

// Host memory that pin_host did not register: correct, but each copy is its
// own call and the driver stages pageable memory through a bounce buffer.
Status CudaBackend::enqueue_unpinned(Direction dir) {
  if (unpinned_.empty()) return Status::ok_status();
  if (unpinned_.size() >= kUnpinnedWarnCopies && !warned_unpinned_.exchange(true)) {
    KVT_LOG_WARN(name_, ": ", unpinned_.size(), " block copies in one call from host memory that pin_host did "
                 "not pin took the slow path (one cudaMemcpyAsync each); pin that memory for batched copies");
  }
  const cudaMemcpyKind kind = dir == Direction::kToDevice ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  for (const BlockCopy& c : unpinned_) {
    KVT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(c.dst, c.src, c.bytes, kind, stream_.get()));
  }
  return Status::ok_status();
}

Result<StreamHandle> create_stream() {
  cudaStream_t s = nullptr;
  // Non-blocking: block copies must not serialize with work on the legacy
  // default stream.
  KVT_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return StreamHandle(s);
}

}  // namespace

Result<std::unique_ptr<ComputeBackend>> make_cuda_backend(int device) {
  KVT_RETURN_IF_ERROR(select_device(device));
  cudaDeviceProp prop{};
  KVT_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  int same_pointer = 0;
  KVT_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&same_pointer, cudaDevAttrCanUseHostPointerForRegisteredMem, device));
  KVT_ASSIGN_OR_RETURN(StreamHandle stream, create_stream());
  std::string name = "cuda:" + std::to_string(device) + " (" + prop.name + ")";
  return std::unique_ptr<ComputeBackend>(
      std::make_unique<CudaBackend>(device, std::move(name), same_pointer != 0, std::move(stream)));
}

void set_batch_copy_method(ComputeBackend& cuda_backend, BatchCopyMethod method) {
  auto* cuda = dynamic_cast<CudaBackend*>(&cuda_backend);
  KVT_ASSERT(cuda != nullptr, "set_batch_copy_method on the ", cuda_backend.name(), " backend, not a CUDA one");
  cuda->set_method(method);
}

}  // namespace kvtier::gpu
