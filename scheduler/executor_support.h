// Private helpers of the executor: pinned, growable host buffers for the
// GPU's per-step uploads and downloads, and a packer that lays out small
// arrays in one buffer so that a step needs one copy per direction.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <thread>
#include <utility>

#include "kvtier/core/assert.h"
#include "kvtier/core/compute_backend.h"
#include "kvtier/core/status.h"
#include "kvtier/scheduler/trace.h"
#include "kvtier/storage/tiered_store.h"

namespace kvtier::scheduler::detail {

inline double wall_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Host memory page-locked through the backend (so async copies really are).
class PinnedBuffer {
 public:
  explicit PinnedBuffer(ComputeBackend& backend) : backend_(backend) {}
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { release(); }

  // At least `bytes` bytes; contents are not kept when it grows.
  Status reserve(uint64_t bytes) {
    if (bytes <= bytes_) return Status::ok_status();
    release();
    const uint64_t rounded = (bytes + 4095) / 4096 * 4096;
    data_ = static_cast<std::byte*>(std::aligned_alloc(4096, rounded));
    if (data_ == nullptr) return out_of_memory("cannot allocate " + std::to_string(rounded) + " bytes of host buffer");
    bytes_ = rounded;
    pinned_ = backend_.pin_host(data_, bytes_).ok();  // unpinned still works, only slower
    return Status::ok_status();
  }
  std::byte* data() const { return data_; }
  uint64_t bytes() const { return bytes_; }

 private:
  void release() {
    if (data_ == nullptr) return;
    if (pinned_) backend_.unpin_host(data_, bytes_);
    std::free(data_);
    data_ = nullptr;
    bytes_ = 0;
    pinned_ = false;
  }
  ComputeBackend& backend_;
  std::byte* data_ = nullptr;
  uint64_t bytes_ = 0;
  bool pinned_ = false;
};

// Lays arrays out back to back (256-byte aligned) and remembers offsets.
class Packer {
 public:
  void clear() { bytes_ = 0; }
  // Reserves room for n elements of T; returns the offset.
  template <class T>
  uint64_t add(size_t n) {
    const uint64_t off = (bytes_ + 255) / 256 * 256;
    bytes_ = off + n * sizeof(T);
    return off;
  }
  uint64_t bytes() const { return bytes_; }

 private:
  uint64_t bytes_ = 0;
};

template <class T>
T* at(std::byte* base, uint64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// The home write of one prefill call's completed blocks, landing on a thread
// of its own while the call scores and attends (DESIGN.md section 4). Its
// blocks stay busy in the store until join(), so none is read from home
// before it has landed: a caller that needs one back from home joins first
// (holds() says which). The destructor joins, so the staged bytes the write
// reads outlive it on every path out of prefill.
class WriteBehind {
 public:
  WriteBehind() = default;
  WriteBehind(const WriteBehind&) = delete;
  WriteBehind& operator=(const WriteBehind&) = delete;
  ~WriteBehind() { (void)join(); }

  // Lands `write` on a new thread, its copies through parallel_for. The
  // blocking NVMe write runs on that thread, outside the CPU engine's arena,
  // so it never holds one of the engine's workers.
  void start(storage::HomeWrite write, storage::ParallelFor parallel_for, TraceRecorder* trace, TraceLane lane) {
    KVT_ASSERT(!thread_.joinable(), "one write behind at a time");
    write_ = std::move(write);
    status_ = Status::ok_status();
    land_us_ = 0;
    if (write_.size() == 0) return;
    thread_ = std::thread([this, pf = std::move(parallel_for), trace, lane] {
      TraceScope scope(trace, lane, "prefill home write (behind)");
      const auto t0 = std::chrono::steady_clock::now();
      (void)write_.land(pf);
      land_us_ = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    });
  }
  // Whether `block` is being written and not yet joined.
  bool holds(uint32_t block) const { return thread_.joinable() && write_.holds(block); }
  // Waits for the write and ends it: its blocks become readable from home,
  // or stay unreadable when it failed (the Status then names block and file).
  // Later calls return the same Status.
  Status join() {
    if (thread_.joinable()) {
      thread_.join();
      status_ = write_.finish();
    }
    return status_;
  }
  // After join(): how long the last write's land took (copies and NVMe
  // writes), and how many of its blocks went to NVMe.
  double land_us() const { return land_us_; }
  size_t nvme_blocks() const { return write_.nvme_size(); }
  // Of land_us: the copies, and the file's NVMe writes (HomeWrite).
  double copy_us() const { return write_.copy_us(); }
  double file_write_us() const { return write_.file_write_us(); }

 private:
  storage::HomeWrite write_;
  std::thread thread_;
  Status status_;
  double land_us_ = 0;  // written by the thread, read after join
};

}  // namespace kvtier::scheduler::detail
