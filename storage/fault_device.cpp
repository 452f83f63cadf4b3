// A BlockDevice over memory that injects the faults real disks produce:
// short reads, -EAGAIN, -EIO (transient or stuck to the pages it hit), bit
// flips on the way back and bit flips at rest. Seeded, so a failure replays.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "kvtier/core/assert.h"
#include "kvtier/storage/block_device.h"

namespace kvtier::storage {

namespace {
constexpr uint64_t kPageBytes = 4096;
constexpr uint32_t kSectorBytes = 512;  // short reads end on a sector boundary, as a disk's do
}  // namespace

// Sparse 4 KiB pages, so a test can create a file of realistic geometry
// without holding it in memory: a page never written reads as zeros.
struct FaultMedium {
  std::mutex mu;
  uint64_t size_bytes = 0;
  std::unordered_map<uint64_t, std::unique_ptr<std::byte[]>> pages;
  std::set<uint64_t> bad_pages;  // pages that fail every request (persistent EIO)

  std::byte* page(uint64_t index) {
    auto& slot = pages[index];
    if (!slot) slot = std::make_unique<std::byte[]>(kPageBytes);  // value-initialised: zeros
    return slot.get();
  }
  // Visits [offset, offset + bytes) page by page: fn(page index, offset in page, bytes, position in range).
  template <class Fn>
  static void for_pages(uint64_t offset, uint64_t bytes, Fn&& fn) {
    for (uint64_t pos = 0; pos < bytes;) {
      const uint64_t at = offset + pos, in_page = at % kPageBytes;
      const uint64_t len = std::min(kPageBytes - in_page, bytes - pos);
      fn(at / kPageBytes, in_page, len, pos);
      pos += len;
    }
  }
  void copy_out(uint64_t offset, std::byte* dst, uint64_t bytes) const {
    for_pages(offset, bytes, [&](uint64_t index, uint64_t in_page, uint64_t len, uint64_t pos) {
      const auto it = pages.find(index);
      if (it == pages.end()) std::memset(dst + pos, 0, len);
      else std::memcpy(dst + pos, it->second.get() + in_page, len);
    });
  }
  void copy_in(uint64_t offset, const std::byte* src, uint64_t bytes) {
    for_pages(offset, bytes, [&](uint64_t index, uint64_t in_page, uint64_t len, uint64_t pos) {
      std::memcpy(page(index) + in_page, src + pos, len);
    });
  }
  bool touches_bad(uint64_t offset, uint64_t bytes) const {
    if (bad_pages.empty() || bytes == 0) return false;
    const auto it = bad_pages.lower_bound(offset / kPageBytes);
    return it != bad_pages.end() && *it <= (offset + bytes - 1) / kPageBytes;
  }
  void mark_bad(uint64_t offset, uint64_t bytes) {
    for_pages(offset, bytes, [&](uint64_t index, uint64_t, uint64_t, uint64_t) { bad_pages.insert(index); });
  }
};

std::shared_ptr<FaultMedium> make_fault_medium() { return std::make_shared<FaultMedium>(); }

namespace {

class FaultDeviceImpl final : public FaultDevice {
 public:
  FaultDeviceImpl(std::shared_ptr<FaultMedium> medium, std::string name, const FaultConfig& faults)
      : medium_(std::move(medium)), name_(std::move(name)), faults_(faults), rng_(faults.seed) {}

  const std::string& path() const override { return name_; }
  Status execute(std::span<IoRequest> requests) override;
  Status allocate(uint64_t bytes) override;
  uint64_t size_bytes() const override {
    std::lock_guard lock(medium_->mu);
    return medium_->size_bytes;
  }
  Status sync() override { return Status::ok_status(); }
  bool register_buffers(std::byte*, uint64_t) override { return false; }
  std::string describe() const override;
  Counters counters() const override {
    std::lock_guard lock(mu_);
    return counters_;
  }
  void set_faults(const FaultConfig& faults) override {
    std::lock_guard lock(mu_);
    faults_ = faults;
    rng_.seed(faults.seed);
  }

 private:
  bool chance(double p) { return p > 0 && std::uniform_real_distribution<double>(0, 1)(rng_) < p; }
  uint64_t uniform(uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_); }
  void flip_bit(std::byte* p, uint64_t bytes) {
    const uint64_t bit = uniform(0, bytes * 8 - 1);
    p[bit / 8] ^= std::byte(1u << (bit % 8));
  }
  int32_t run(IoRequest& r);
  int32_t read(IoRequest& r);
  int32_t write(IoRequest& r);

  std::shared_ptr<FaultMedium> medium_;
  std::string name_;
  mutable std::mutex mu_;  // guards faults_, rng_ and counters_
  FaultConfig faults_;
  std::mt19937_64 rng_;
  Counters counters_;
};

Status FaultDeviceImpl::execute(std::span<IoRequest> requests) {
  uint32_t latency_us = 0;
  {
    std::lock_guard lock(mu_);
    latency_us = faults_.latency_us;
    for (IoRequest& r : requests) r.result = run(r);
  }
  if (latency_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(latency_us));
  return Status::ok_status();
}

// Faults that fail the whole request come first; then the transfer itself.
int32_t FaultDeviceImpl::run(IoRequest& r) {
  ++counters_.requests;
  bool stuck = false;
  {
    std::lock_guard lock(medium_->mu);
    stuck = medium_->touches_bad(r.offset, r.bytes);
  }
  if (stuck) {
    ++counters_.eios;
    return -EIO;
  }
  if (chance(faults_.eagain)) {
    ++counters_.eagains;
    return -EAGAIN;
  }
  if (chance(faults_.eio)) {
    ++counters_.eios;
    if (faults_.persistent_eio) {
      std::lock_guard lock(medium_->mu);
      medium_->mark_bad(r.offset, r.bytes);
    }
    return -EIO;
  }
  return r.op == IoRequest::Op::kRead ? read(r) : write(r);
}

int32_t FaultDeviceImpl::read(IoRequest& r) {
  std::lock_guard lock(medium_->mu);
  // Like a file: nothing past the end, a short read at it.
  if (r.offset >= medium_->size_bytes) return 0;
  uint64_t n = std::min<uint64_t>(r.bytes, medium_->size_bytes - r.offset);
  if (n > kSectorBytes && chance(faults_.short_read)) {
    n = kSectorBytes * uniform(1, (n - 1) / kSectorBytes);
    ++counters_.short_reads;
  }
  medium_->copy_out(r.offset, r.buf, n);
  if (n > 0 && chance(faults_.flip_on_read)) {
    flip_bit(r.buf, n);
    ++counters_.read_flips;
  }
  return static_cast<int32_t>(n);
}

int32_t FaultDeviceImpl::write(IoRequest& r) {
  std::lock_guard lock(medium_->mu);
  const uint64_t end = r.offset + r.bytes;
  uint64_t n = r.bytes;
  if (end > faults_.capacity_bytes) {
    // Like a filling disk: the whole sectors that fit land, the retry of the rest fails.
    const uint64_t room = r.offset < faults_.capacity_bytes ? faults_.capacity_bytes - r.offset : 0;
    n = room / kSectorBytes * kSectorBytes;
    if (n == 0) return -ENOSPC;
  }
  if (n == r.bytes && n > kSectorBytes && chance(faults_.short_write)) {
    n = kSectorBytes * uniform(1, (n - 1) / kSectorBytes);
    ++counters_.short_writes;
  }
  medium_->copy_in(r.offset, r.buf, n);
  medium_->size_bytes = std::max(medium_->size_bytes, r.offset + n);
  if (n > 0 && chance(faults_.flip_stored)) {
    const uint64_t bit = uniform(0, n * 8 - 1);
    medium_->page((r.offset + bit / 8) / kPageBytes)[(r.offset + bit / 8) % kPageBytes] ^= std::byte(1u << (bit % 8));
    ++counters_.stored_flips;
  }
  return static_cast<int32_t>(n);
}

Status FaultDeviceImpl::allocate(uint64_t bytes) {
  uint64_t capacity = 0;
  {
    std::lock_guard lock(mu_);
    capacity = faults_.capacity_bytes;
  }
  std::lock_guard lock(medium_->mu);
  if (bytes > capacity) {
    const uint64_t free_bytes = capacity - std::min(capacity, medium_->size_bytes);
    return no_space("no space for " + name_ + ": it needs " + std::to_string(bytes) + " bytes and " +
                    std::to_string(free_bytes) + " bytes are free; free space or choose another directory");
  }
  medium_->size_bytes = std::max(medium_->size_bytes, bytes);
  return Status::ok_status();
}

std::string FaultDeviceImpl::describe() const {
  std::lock_guard lock(mu_);
  std::ostringstream os;
  os << "fault device over memory (seed " << faults_.seed << ", short_read " << faults_.short_read << ", short_write " << faults_.short_write << ", eagain "
     << faults_.eagain << ", eio " << faults_.eio << (faults_.persistent_eio ? " persistent" : "")
     << ", flip_on_read " << faults_.flip_on_read << ", flip_stored " << faults_.flip_stored << ")";
  return os.str();
}

}  // namespace

std::unique_ptr<FaultDevice> make_fault_device(std::shared_ptr<FaultMedium> medium, std::string name,
                                               const FaultConfig& faults) {
  KVT_ASSERT(medium != nullptr, "a fault device needs a medium (make_fault_medium())");
  return std::make_unique<FaultDeviceImpl>(std::move(medium), std::move(name), faults);
}

}  // namespace kvtier::storage
