// The io_uring BlockDevice: one ring per file, O_DIRECT unless the file
// system refuses it and the caller allowed buffered I/O.
#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "kvtier/core/log.h"
#include "kvtier/storage/block_device.h"
#include "uring_util.h"

namespace kvtier::storage {
namespace {

using detail::errno_text;
using detail::Ring;
using detail::UniqueFd;

// The kernel refuses a single registered buffer larger than 1 GiB.
constexpr uint64_t kFixedBufferMaxBytes = uint64_t{1} << 30;
// Most registered buffers one ring accepts (IORING_MAX_REG_BUFFERS).
constexpr uint64_t kFixedBuffersMax = 1u << 14;
constexpr uint32_t kQueueDepthMax = 4096;
// Consecutive ring calls that made no progress before execute() gives up.
constexpr int kStallLimit = 1000;
// 10 ms waits for in-flight requests after the ring failed: 1 s in all.
constexpr int kDrainWaits = 100;

std::string human_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  char text[32];
  std::snprintf(text, sizeof text, "%.1f %s", v, units[u]);
  return text;
}

class UringDevice final : public BlockDevice {
 public:
  UringDevice(std::string path, UniqueFd fd, bool direct, uint32_t queue_depth, uint64_t size_bytes,
              uint64_t reserve_bytes)
      : path_(std::move(path)), fd_(std::move(fd)), direct_(direct), queue_depth_(queue_depth),
        size_bytes_(size_bytes), reserve_bytes_(reserve_bytes) {}

  Status init_ring() {
    const int ret = ring_.init(queue_depth_);
    if (ret < 0)
      return unavailable("io_uring_queue_init(" + std::to_string(queue_depth_) + ") for " + path_ + ": " +
                         errno_text(-ret) + " (the kernel or a seccomp policy refuses io_uring)");
    return Status::ok_status();
  }

  const std::string& path() const override { return path_; }
  uint64_t size_bytes() const override { return size_bytes_; }
  Status execute(std::span<IoRequest> requests) override;
  Status allocate(uint64_t bytes) override;
  Status sync() override;
  bool register_buffers(std::byte* base, uint64_t bytes) override;
  std::string describe() const override;

 private:
  void prep(io_uring_sqe* sqe, const IoRequest& r, uint64_t tag);
  int fixed_index(const IoRequest& r) const;
  unsigned reap(std::span<IoRequest> requests);
  Status fail(Status status, std::span<IoRequest> requests, unsigned in_flight);
  uint64_t free_bytes() const;
  Status no_space_status(uint64_t bytes, uint64_t free) const;

  std::string path_;
  UniqueFd fd_;
  Ring ring_;
  bool direct_;
  uint32_t queue_depth_;
  uint64_t size_bytes_;
  uint64_t reserve_bytes_;  // UringOptions::reserve_bytes
  std::byte* fixed_base_ = nullptr;  // registered region, or null
  uint64_t fixed_bytes_ = 0;
  Status broken_;  // set once the ring failed; every later execute() returns it
};

// The registered buffer that holds all of r's bytes, or -1 (use a plain request).
int UringDevice::fixed_index(const IoRequest& r) const {
  if (fixed_base_ == nullptr || r.buf < fixed_base_ || r.bytes == 0) return -1;
  const uint64_t begin = static_cast<uint64_t>(r.buf - fixed_base_);
  const uint64_t end = begin + r.bytes;
  if (end > fixed_bytes_) return -1;
  const uint64_t first = begin / kFixedBufferMaxBytes, last = (end - 1) / kFixedBufferMaxBytes;
  return first == last ? static_cast<int>(first) : -1;
}

void UringDevice::prep(io_uring_sqe* sqe, const IoRequest& r, uint64_t tag) {
  const int index = fixed_index(r);
  const bool read = r.op == IoRequest::Op::kRead;
  if (index >= 0 && read) {
    io_uring_prep_read_fixed(sqe, fd_.get(), r.buf, r.bytes, r.offset, index);
  } else if (index >= 0) {
    io_uring_prep_write_fixed(sqe, fd_.get(), r.buf, r.bytes, r.offset, index);
  } else if (read) {
    io_uring_prep_read(sqe, fd_.get(), r.buf, r.bytes, r.offset);
  } else {
    io_uring_prep_write(sqe, fd_.get(), r.buf, r.bytes, r.offset);
  }
  io_uring_sqe_set_data64(sqe, tag);
}

// Takes every completion that is ready, in one batch; returns how many.
unsigned UringDevice::reap(std::span<IoRequest> requests) {
  io_uring_cqe* cqe = nullptr;
  unsigned head = 0, seen = 0;
  io_uring_for_each_cqe(ring_.get(), head, cqe) {
    const uint64_t tag = io_uring_cqe_get_data64(cqe);
    KVT_ASSERT(tag < requests.size(), "completion tag ", tag, " of ", requests.size(), " requests");
    requests[tag].result = cqe->res;
    ++seen;
  }
  io_uring_cq_advance(ring_.get(), seen);
  return seen;
}

Status UringDevice::execute(std::span<IoRequest> requests) {
  if (!broken_.ok()) return broken_;
  size_t next = 0, done = 0;
  unsigned in_flight = 0;  // prepared (submitted or not yet) and not completed
  int stalls = 0;
  while (done < requests.size()) {
    // The SQ has queue_depth_ entries and the CQ twice that, so bounding
    // in-flight requests by queue_depth_ also keeps the CQ from overflowing.
    while (next < requests.size() && in_flight < queue_depth_) {
      io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
      if (sqe == nullptr) break;
      prep(sqe, requests[next], next);
      ++next, ++in_flight;
    }
    const int ret = io_uring_submit_and_wait(ring_.get(), 1);
    // EINTR: a signal; EAGAIN/EBUSY: the kernel is short of resources or has
    // completions to hand back first. All three resolve by reaping and retrying.
    if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
      return fail(internal_error("io_uring_submit_and_wait on " + path_ + ": " + errno_text(-ret)), requests,
                  in_flight);
    const unsigned reaped = reap(requests);
    in_flight -= reaped, done += reaped;
    stalls = reaped > 0 ? 0 : stalls + 1;
    if (stalls > kStallLimit)
      return fail(internal_error("io_uring on " + path_ + " made no progress in " + std::to_string(kStallLimit) +
                                 " submit calls (" + std::to_string(in_flight) + " requests in flight)"),
                  requests, in_flight);
  }
  return Status::ok_status();
}

// Requests still in flight point into the caller's buffers, so they are
// waited for (bounded) before returning; SQEs left unsubmitted would carry
// tags of this call into the next, so the device refuses further work.
Status UringDevice::fail(Status status, std::span<IoRequest> requests, unsigned in_flight) {
  for (int waits = 0; in_flight > 0 && waits < kDrainWaits; ++waits) {
    __kernel_timespec timeout{0, 10'000'000};  // 10 ms
    io_uring_cqe* cqe = nullptr;
    if (io_uring_wait_cqe_timeout(ring_.get(), &cqe, &timeout) == 0) in_flight -= reap(requests);
  }
  if (in_flight > 0)
    KVT_LOG_ERROR(path_, ": ", in_flight, " io_uring requests still in flight after the ring failed");
  broken_ = status.with_context("the device is unusable after an earlier failure");
  return status;
}

// Free bytes on the file system under the file, or UINT64_MAX if unknown.
uint64_t UringDevice::free_bytes() const {
  struct statvfs vfs{};
  if (::fstatvfs(fd_.get(), &vfs) != 0) return UINT64_MAX;
  return uint64_t{vfs.f_bavail} * vfs.f_frsize;
}

Status UringDevice::no_space_status(uint64_t bytes, uint64_t free) const {
  const std::string free_text = free == UINT64_MAX ? "free space is unknown"
                                                   : std::to_string(free) + " bytes (" + human_bytes(free) + ") are free";
  return no_space("no space for " + path_ + ": it needs " + std::to_string(bytes) + " bytes (" +
                  human_bytes(bytes) + ") and " + free_text + "; free space or choose another directory");
}

Status UringDevice::allocate(uint64_t bytes) {
  if (bytes <= size_bytes_) return Status::ok_status();
  if (reserve_bytes_ < bytes) {
    // A sparse file: only the part that will be written must fit the disk.
    const uint64_t free = free_bytes();
    if (free != UINT64_MAX && free < reserve_bytes_) return no_space_status(reserve_bytes_, free);
    if (::ftruncate(fd_.get(), static_cast<off_t>(bytes)) != 0)
      return io_error("ftruncate(" + path_ + ", " + std::to_string(bytes) + " bytes): " + errno_text(errno));
    size_bytes_ = bytes;
    return Status::ok_status();
  }
  // Free space is read first: a failed fallocate may hold what it got
  // until it is undone below.
  const uint64_t free = free_bytes();
  int err = ::fallocate(fd_.get(), 0, 0, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
  // Without fallocate a full disk would surface only mid-run as a failed
  // write. Buffered files accept glibc's emulation (a write per block);
  // O_DIRECT files cannot take its one-byte writes.
  if (err == EOPNOTSUPP && !direct_) err = ::posix_fallocate(fd_.get(), 0, static_cast<off_t>(bytes));
  if (err == 0) {
    size_bytes_ = bytes;
    return Status::ok_status();
  }
  // Give back any blocks the failed call kept, so a refused file does not fill the disk.
  if (::ftruncate(fd_.get(), static_cast<off_t>(size_bytes_)) != 0)
    KVT_LOG_WARN("ftruncate(", path_, ") after a failed fallocate: ", errno_text(errno));
  if (err == ENOSPC || err == EDQUOT) return no_space_status(bytes, free);
  if (err == EOPNOTSUPP)
    return unsupported("the file system under " + path_ + " does not support fallocate, which kvtier needs to "
                       "reserve the file's " + std::to_string(bytes) + " bytes up front; use a local file "
                       "system (ext4, xfs, btrfs)");
  return io_error("fallocate(" + path_ + ", " + std::to_string(bytes) + " bytes): " + errno_text(err));
}

Status UringDevice::sync() {
  if (::fdatasync(fd_.get()) != 0) return io_error("fdatasync(" + path_ + "): " + errno_text(errno));
  return Status::ok_status();
}

bool UringDevice::register_buffers(std::byte* base, uint64_t bytes) {
  if (fixed_base_ != nullptr) {
    io_uring_unregister_buffers(ring_.get());
    fixed_base_ = nullptr, fixed_bytes_ = 0;
  }
  const uint64_t count = (bytes + kFixedBufferMaxBytes - 1) / kFixedBufferMaxBytes;
  int ret = -EINVAL;
  if (bytes > 0 && count <= kFixedBuffersMax) {
    std::vector<iovec> iovs(count);
    for (uint64_t i = 0; i < count; ++i)
      iovs[i] = iovec{base + i * kFixedBufferMaxBytes, std::min(kFixedBufferMaxBytes, bytes - i * kFixedBufferMaxBytes)};
    ret = io_uring_register_buffers(ring_.get(), iovs.data(), static_cast<unsigned>(count));
  }
  if (ret == 0) {
    fixed_base_ = base, fixed_bytes_ = bytes;
    return true;
  }
  // Usually RLIMIT_MEMLOCK (ENOMEM): plain buffers cost a page pin per
  // request, not correctness, so one line per process is enough.
  static std::atomic<bool> logged{false};
  if (!logged.exchange(true))
    KVT_LOG_INFO("fixed buffers unavailable: io_uring_register_buffers(", bytes, " bytes): ", errno_text(-ret),
                 (ret == -ENOMEM ? " (raise ulimit -l)" : ""), "; using plain buffers");
  return false;
}

std::string UringDevice::describe() const {
  return "io_uring QD" + std::to_string(queue_depth_) +
         (direct_ ? ", O_DIRECT" : ", buffered (the file system refuses O_DIRECT; page cache in use)") +
         (fixed_base_ != nullptr ? ", fixed buffers" : ", plain buffers");
}

// Opens with O_DIRECT; on EINVAL (the file system refuses it) *refused is set
// and, for a create, the half-made file is removed: older kernels create it
// on tmpfs before refusing, and O_EXCL proves that file was ours.
UniqueFd open_file(const std::string& path, bool create, bool direct, int* err) {
  const int flags = O_RDWR | O_CLOEXEC | (direct ? O_DIRECT : 0) | (create ? O_CREAT | O_EXCL : 0);
  UniqueFd fd(::open(path.c_str(), flags, 0644));
  *err = fd.valid() ? 0 : errno;
  if (create && direct && *err == EINVAL) ::unlink(path.c_str());
  return fd;
}

Status open_error(const std::string& path, bool create, bool direct, int err) {
  const std::string call = std::string("open(") + path + (create ? ", create" : "") +
                           (direct ? ", O_DIRECT" : ", buffered") + "): " + errno_text(err);
  if (err == ENOENT) return not_found(call);
  return io_error(call);
}

}  // namespace

Result<std::unique_ptr<BlockDevice>> open_uring_device(const std::string& path, bool create,
                                                       const UringOptions& options) {
  if (options.queue_depth < 1 || options.queue_depth > kQueueDepthMax)
    return invalid_field("io_uring device", "queue_depth", options.queue_depth, "is outside 1..4096");
  int err = 0;
  bool direct = true;
  UniqueFd fd = open_file(path, create, direct, &err);
  if (err == EINVAL) {
    if (!options.allow_buffered)
      return unsupported(path + ": the file system refuses O_DIRECT; pass --allow-buffered-io to use "
                         "buffered I/O (slower, uses the page cache)");
    KVT_LOG_WARN(path, ": the file system refuses O_DIRECT; using buffered I/O (slower, uses the page cache)");
    direct = false;
    fd = open_file(path, create, direct, &err);
  }
  if (!fd.valid()) return open_error(path, create, direct, err);
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) return io_error("fstat(" + path + "): " + errno_text(errno));
  auto device = std::make_unique<UringDevice>(path, std::move(fd), direct, options.queue_depth,
                                              static_cast<uint64_t>(st.st_size), options.reserve_bytes);
  if (Status ring = device->init_ring(); !ring.ok()) {
    if (create) ::unlink(path.c_str());  // O_EXCL made it ours; leave nothing behind
    return ring;
  }
  return std::unique_ptr<BlockDevice>(std::move(device));
}

}  // namespace kvtier::storage
