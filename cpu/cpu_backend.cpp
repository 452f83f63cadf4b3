// The CPU backend: "device" memory is page-aligned host memory under a byte
// limit, pinning is mlock, and copies are memcpy spread over oneTBB workers.
#include "kvtier/cpu/cpu_backend.h"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "kvtier/core/log.h"
#include "kvtier/core/sysinfo.h"
#include "kvtier/core/sizes.h"

namespace kvtier::cpu {
namespace {

constexpr uint64_t kPageBytes = 4096;
// Below this many bytes per batch, handing copies to worker threads costs more
// than it saves: one core copies ~1 MiB in tens of microseconds.
constexpr uint64_t kParallelCopyBytes = uint64_t{1} << 20;

// "1 GiB (1073741824 bytes)": readable, and exact for whoever compares numbers.
std::string bytes_text(uint64_t bytes) { return format_bytes(bytes) + " (" + std::to_string(bytes) + " bytes)"; }

std::string memlock_limit_text() {
  rlimit lim{};
  if (getrlimit(RLIMIT_MEMLOCK, &lim) != 0) return "unknown";
  if (lim.rlim_cur == RLIM_INFINITY) return "unlimited";
  return format_bytes(lim.rlim_cur);
}

void copy_all(std::span<const BlockCopy> copies) {
  uint64_t total_bytes = 0;
  for (const BlockCopy& c : copies) {
    KVT_ASSERT(c.bytes == 0 || (c.src != nullptr && c.dst != nullptr), "null pointer in a ", c.bytes,
               "-byte block copy");
    total_bytes += c.bytes;
  }
  if (total_bytes < kParallelCopyBytes || copies.size() < 2) {
    for (const BlockCopy& c : copies) std::memcpy(c.dst, c.src, c.bytes);
    return;
  }
  tbb::parallel_for(tbb::blocked_range<size_t>(0, copies.size()), [&](const tbb::blocked_range<size_t>& r) {
    for (size_t i = r.begin(); i != r.end(); ++i) std::memcpy(copies[i].dst, copies[i].src, copies[i].bytes);
  });
}

class CpuBackend final : public ComputeBackend {
 public:
  explicit CpuBackend(uint64_t limit_bytes) : limit_bytes_(limit_bytes) {}

  std::string_view name() const override { return "cpu"; }
  bool device_is_host() const override { return true; }

  Result<DeviceMemory> allocate_device(uint64_t bytes) override;
  Result<std::pair<uint64_t, uint64_t>> device_memory_info() override {
    const uint64_t used = allocated_->load(std::memory_order_relaxed);
    return std::pair{limit_bytes_ - std::min(used, limit_bytes_), limit_bytes_};
  }

  Status pin_host(void* p, uint64_t bytes) override;
  void unpin_host(void* p, uint64_t bytes) override {
    if (munlock(p, bytes) != 0) KVT_LOG_WARN("munlock(", bytes, " bytes) failed: ", std::strerror(errno));
  }

  Status copy_to_device(std::span<const BlockCopy> copies) override {
    copy_all(copies);
    return Status::ok_status();
  }
  Status copy_to_host(std::span<const BlockCopy> copies) override {
    copy_all(copies);
    return Status::ok_status();
  }

 private:
  // Reserves `bytes` against the limit; false when they do not fit.
  bool reserve(uint64_t bytes);

  const uint64_t limit_bytes_;
  // Shared with the release functions so that memory freed after the backend
  // is gone still finds its counter.
  std::shared_ptr<std::atomic<uint64_t>> allocated_ = std::make_shared<std::atomic<uint64_t>>(0);
};

bool CpuBackend::reserve(uint64_t bytes) {
  uint64_t used = allocated_->load(std::memory_order_relaxed);
  do {
    if (bytes > limit_bytes_ || used > limit_bytes_ - bytes) return false;
  } while (!allocated_->compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return true;
}

Result<DeviceMemory> CpuBackend::allocate_device(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("cpu backend: allocate_device of 0 bytes");
  // aligned_alloc needs a size that is a multiple of the alignment.
  const uint64_t rounded = (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
  const auto out_of_memory_status = [&] {
    const auto [free_bytes, total_bytes] = device_memory_info().value();
    return out_of_memory("cpu backend: cannot allocate " + bytes_text(bytes) + " of device memory: " +
                         format_bytes(free_bytes) + " free of a " + format_bytes(total_bytes) +
                         " limit; ask for less device memory");
  };
  if (rounded < bytes || !reserve(rounded)) return out_of_memory_status();
  void* p = std::aligned_alloc(kPageBytes, rounded);
  if (p == nullptr) {
    allocated_->fetch_sub(rounded, std::memory_order_relaxed);
    return out_of_memory_status();
  }
  return DeviceMemory(p, bytes, [counter = allocated_, rounded](void* q) {
    std::free(q);
    counter->fetch_sub(rounded, std::memory_order_relaxed);
  });
}

Status CpuBackend::pin_host(void* p, uint64_t bytes) {
  if (mlock(p, bytes) == 0) return Status::ok_status();
  const int err = errno;
  return unavailable("mlock of " + format_bytes(bytes) + " failed: " + std::strerror(err) + " (errno " +
                     std::to_string(err) + "; RLIMIT_MEMLOCK is " +
                     memlock_limit_text() + "; raise it with `ulimit -l` or run unpinned)");
}

}  // namespace

std::unique_ptr<ComputeBackend> make_cpu_backend(uint64_t device_bytes_limit) {
  const uint64_t limit = device_bytes_limit != 0 ? device_bytes_limit : mem_available_bytes();
  return std::make_unique<CpuBackend>(limit);
}

}  // namespace kvtier::cpu
