// Private to storage/: RAII owners of the file descriptors, io_uring rings and
// aligned buffers that the io_uring device and the I/O probe share.
#pragma once

#include <liburing.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

namespace kvtier::storage::detail {

inline std::string errno_text(int err) { return std::strerror(err); }

// Owns a file descriptor; closes it on every path out.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    std::swap(fd_, other.fd_);
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// An io_uring instance, torn down with its owner. Not movable: the kernel's
// mappings are addressed through the io_uring struct in place.
class Ring {
 public:
  Ring() = default;
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  ~Ring() {
    if (ready_) io_uring_queue_exit(&ring_);
  }
  // 0 or -errno, as io_uring_queue_init returns it.
  int init(unsigned depth) {
    const int ret = io_uring_queue_init(depth, &ring_, 0);
    ready_ = ret == 0;
    return ret;
  }
  io_uring* get() { return &ring_; }

 private:
  io_uring ring_{};
  bool ready_ = false;
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<std::byte[], FreeDeleter>;

// `bytes` (rounded up to `align`) aligned to `align`, zeroed; null when out of memory.
inline AlignedBytes aligned_bytes(size_t bytes, size_t align) {
  const size_t rounded = (bytes + align - 1) / align * align;
  auto* p = static_cast<std::byte*>(std::aligned_alloc(align, rounded == 0 ? align : rounded));
  if (p != nullptr) std::memset(p, 0, rounded);
  return AlignedBytes(p);
}

}  // namespace kvtier::storage::detail
