// BlockDevice: the raw file under the NVMe tier. It executes batches of
// aligned reads and writes at fixed offsets and reports each request's result
// as the kernel would (bytes moved, possibly short, or -errno); retrying,
// checksums and error messages are BlockFile's job, so that the io_uring
// device and the fault-injecting device are interchangeable underneath it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "kvtier/core/status.h"

namespace kvtier::storage {

struct IoRequest {
  enum class Op : uint8_t { kRead, kWrite };
  Op op = Op::kRead;
  uint64_t offset = 0;      // byte offset in the file; 4 KiB-aligned for O_DIRECT
  std::byte* buf = nullptr; // 4 KiB-aligned for O_DIRECT
  uint32_t bytes = 0;
  int32_t result = 0;       // filled by execute(): bytes moved (maybe short) or -errno
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual const std::string& path() const = 0;
  // Executes every request, keeping up to the queue depth in flight, and fills
  // each result. An error Status means the device itself broke (the ring
  // failed); per-request failures are in results.
  virtual Status execute(std::span<IoRequest> requests) = 0;
  // Grows the file to `bytes` with real blocks (fallocate): a full disk fails here.
  virtual Status allocate(uint64_t bytes) = 0;
  virtual uint64_t size_bytes() const = 0;
  // Makes completed writes durable (fdatasync).
  virtual Status sync() = 0;
  // Registers [base, base + bytes) as fixed buffers where the device can;
  // returns false (and keeps working with plain buffers) where it cannot.
  virtual bool register_buffers(std::byte* base, uint64_t bytes) = 0;
  // One line on how the device runs: "io_uring QD64, O_DIRECT, fixed buffers".
  virtual std::string describe() const = 0;
};

struct UringOptions {
  uint32_t queue_depth = 64;
  bool allow_buffered = false;  // fall back to buffered I/O when O_DIRECT is refused
  // When the file will only ever hold part of its blocks (the rest live in
  // host RAM), a sparse file whose creation only checks that this many bytes
  // are free, instead of reserving the whole file with fallocate. A disk that
  // fills up later fails the writes, which report it.
  uint64_t reserve_bytes = UINT64_MAX;
};

// Opens (create = true: creates, fails if it exists) a file for io_uring with
// O_DIRECT. Errors name the path, the call and the errno text; a file system
// that refuses O_DIRECT is an error unless options.allow_buffered.
Result<std::unique_ptr<BlockDevice>> open_uring_device(const std::string& path, bool create,
                                                       const UringOptions& options);

// Faults a FaultDevice injects, each with a probability per request.
struct FaultConfig {
  uint64_t seed = 1;
  double short_read = 0;     // read returns a prefix (transient: a retry of the rest succeeds)
  double short_write = 0;    // write stores and returns a prefix of whole sectors (the rest is retried)
  double eagain = 0;         // request fails with -EAGAIN (transient)
  double eio = 0;            // request fails with -EIO (transient unless persistent_eio)
  bool persistent_eio = false;
  double flip_on_read = 0;   // one bit of the returned data flipped (transient: stored bytes intact)
  double flip_stored = 0;    // one bit of the stored data flipped on write (persistent corruption)
  uint64_t capacity_bytes = UINT64_MAX;  // allocate() beyond this fails with ENOSPC; a write stores the sectors below it, then ENOSPC
  uint32_t latency_us = 0;   // added to every execute() call
};

// A BlockDevice over memory, seeded so a failing test replays. Counts what it injected.
class FaultDevice : public BlockDevice {
 public:
  struct Counters {
    uint64_t short_reads = 0, short_writes = 0, eagains = 0, eios = 0, read_flips = 0, stored_flips = 0, requests = 0;
  };
  virtual Counters counters() const = 0;
  virtual void set_faults(const FaultConfig& faults) = 0;  // change faults mid-test
};

// The bytes a FaultDevice stores, shared so that a file can be closed and
// "reopened" by a second device over the same medium.
struct FaultMedium;
std::shared_ptr<FaultMedium> make_fault_medium();

std::unique_ptr<FaultDevice> make_fault_device(std::shared_ptr<FaultMedium> medium, std::string name,
                                               const FaultConfig& faults);

}  // namespace kvtier::storage
