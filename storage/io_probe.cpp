#include "kvtier/storage/io_probe.h"

#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include "uring_util.h"

namespace kvtier::storage {
namespace {

using detail::errno_text;
using detail::FreeDeleter;
using detail::Ring;
using detail::UniqueFd;

// One aligned block: O_DIRECT needs the buffer, offset and length aligned to
// the device's logical block size, and 4 KiB covers every NVMe format.
constexpr size_t kProbeBytes = 4096;

using AlignedBuffer = std::unique_ptr<uint8_t[], FreeDeleter>;

// kProbeBytes aligned to kProbeBytes; null only when the host is out of memory.
AlignedBuffer aligned_buffer() {
  return AlignedBuffer(static_cast<uint8_t*>(std::aligned_alloc(kProbeBytes, kProbeBytes)));
}

// Varies within each 256-byte run and between runs, so a read that lands at
// the wrong offset or returns stale zeros fails the comparison.
uint8_t pattern_byte(size_t i) { return static_cast<uint8_t>(i * 131 + (i >> 8) + 17); }

// A probe file: created in dir under a fresh name and unlinked at once, so
// nothing is left behind however the probe ends.
struct ProbeFile {
  UniqueFd fd;
  std::string path;  // the name it had, for messages
  int open_errno = 0;
};

// pid, a per-process counter and the clock make clashes rare; O_EXCL makes
// them harmless. (std::random_device is avoided: it may throw.)
std::string probe_name(const std::string& dir) {
  static std::atomic<uint32_t> counter{0};
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  return dir + "/.kvtier-io-probe-" + std::to_string(getpid()) + "-" +
         std::to_string(counter.fetch_add(1)) + "-" + std::to_string(now % 1000000007);
}

// Like mkstemp, but with O_DIRECT on the open itself so the answer is the
// file system's, not fcntl's. Retries only on a name that is already taken.
ProbeFile create_probe_file(const std::string& dir, bool direct) {
  const int flags = O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | (direct ? O_DIRECT : 0);
  ProbeFile file;
  for (int attempt = 0; attempt < 16; ++attempt) {
    file.path = probe_name(dir);
    file.fd = UniqueFd(::open(file.path.c_str(), flags, 0600));
    file.open_errno = file.fd.valid() ? 0 : errno;
    if (file.open_errno != EEXIST) break;
  }
  // Kernels before 6.6 create the file on tmpfs and only then refuse
  // O_DIRECT; the name was new (O_EXCL), so whatever is there is ours.
  if (file.fd.valid() || file.open_errno == EINVAL) ::unlink(file.path.c_str());
  return file;
}

// Writes the pattern at offset 0 and reads it back with plain pread; "" on
// success, else the failing call and errno text.
std::string write_and_verify(const ProbeFile& file) {
  AlignedBuffer out = aligned_buffer(), in = aligned_buffer();
  if (!out || !in) return "aligned_alloc(4096): " + errno_text(ENOMEM);
  for (size_t i = 0; i < kProbeBytes; ++i) out[i] = pattern_byte(i);
  const ssize_t wrote = ::pwrite(file.fd.get(), out.get(), kProbeBytes, 0);
  if (wrote < 0) return "pwrite " + file.path + ": " + errno_text(errno);
  if (wrote != static_cast<ssize_t>(kProbeBytes)) return "pwrite " + file.path + ": short write";
  const ssize_t got = ::pread(file.fd.get(), in.get(), kProbeBytes, 0);
  if (got < 0) return "pread " + file.path + ": " + errno_text(errno);
  if (got != static_cast<ssize_t>(kProbeBytes) || std::memcmp(in.get(), out.get(), kProbeBytes) != 0) {
    return "pread " + file.path + ": read back different bytes than were written";
  }
  return {};
}

// The outcome of one read through the ring: bytes read or -errno, and the
// liburing call that produced it, for the message.
struct RingStep {
  int res = 0;
  const char* call = "";
};

// One read of [done, kProbeBytes) through the ring.
RingStep ring_read(Ring& ring, int fd, uint8_t* buf, size_t done) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring.get());
  if (sqe == nullptr) return {-EBUSY, "io_uring_get_sqe"};
  io_uring_prep_read(sqe, fd, buf + done, static_cast<unsigned>(kProbeBytes - done), done);
  const int submitted = io_uring_submit(ring.get());
  if (submitted < 0) return {submitted, "io_uring_submit"};
  io_uring_cqe* cqe = nullptr;
  const int waited = io_uring_wait_cqe(ring.get(), &cqe);
  if (waited < 0) return {waited, "io_uring_wait_cqe"};
  const RingStep step{cqe->res, "io_uring read"};
  io_uring_cqe_seen(ring.get(), cqe);
  return step;
}

// Reads the probe file back through io_uring; "" on success. Short reads and
// -EAGAIN are retried, as liburing's examples do.
std::string read_through_ring(const ProbeFile& file) {
  Ring ring;
  const int init = ring.init(8);
  if (init < 0) return "io_uring_queue_init: " + errno_text(-init);
  AlignedBuffer in = aligned_buffer();
  if (!in) return "aligned_alloc(4096): " + errno_text(ENOMEM);
  std::memset(in.get(), 0, kProbeBytes);
  size_t done = 0;
  for (int attempt = 0; attempt < 8 && done < kProbeBytes; ++attempt) {
    const RingStep step = ring_read(ring, file.fd.get(), in.get(), done);
    const std::string where = std::string(step.call) + " " + file.path + ": ";
    if (step.res == -EAGAIN) continue;
    if (step.res < 0) return where + errno_text(-step.res);
    if (step.res == 0) return where + "unexpected end of file";
    done += static_cast<size_t>(step.res);
  }
  if (done != kProbeBytes) return "io_uring read " + file.path + ": still short after 8 attempts";
  for (size_t i = 0; i < kProbeBytes; ++i) {
    if (in[i] != pattern_byte(i)) return "io_uring read " + file.path + ": read back different bytes";
  }
  return {};
}

void add_error(IoProbe& p, const std::string& message) {
  if (message.empty()) return;
  p.error = p.error ? *p.error + "; " + message : message;
}

// Names the directory first, since that is what the user chose and can fix.
std::string open_error(const std::string& dir, const ProbeFile& file, bool direct) {
  const std::string what = file.open_errno == EINVAL && direct
                               ? "the file system under " + dir + " refuses O_DIRECT"
                               : "cannot create a file in " + dir;
  return what + ": open(" + (direct ? "O_DIRECT" : "buffered") + ") " + file.path + ": " +
         errno_text(file.open_errno);
}

}  // namespace

IoProbe probe_io(const std::string& dir) {
  IoProbe p;
  p.dir = dir;
  ProbeFile file = create_probe_file(dir, /*direct=*/true);
  // EINVAL is the file system refusing O_DIRECT (tmpfs before 6.6, some
  // FUSE and network mounts). Any other errno means dir itself is unusable:
  // missing, not a directory, read-only or not writable.
  if (!file.fd.valid() && file.open_errno != EINVAL) {
    add_error(p, open_error(dir, file, /*direct=*/true));
    return p;
  }
  if (file.fd.valid()) {
    const std::string failure = write_and_verify(file);
    p.o_direct = failure.empty();
    add_error(p, failure.empty() ? "" : failure + " (with O_DIRECT)");
  } else {
    add_error(p, open_error(dir, file, /*direct=*/true));
  }
  // Without working O_DIRECT, io_uring is still worth knowing about: the
  // tier can run on buffered I/O, only slower and through the page cache.
  if (!p.o_direct) {
    file = create_probe_file(dir, /*direct=*/false);
    const std::string failure =
        file.fd.valid() ? write_and_verify(file) : open_error(dir, file, /*direct=*/false);
    if (!failure.empty()) {
      add_error(p, failure);
      return p;
    }
  }
  const std::string ring_failure = read_through_ring(file);
  p.io_uring = ring_failure.empty();
  add_error(p, ring_failure);
  return p;
}

}  // namespace kvtier::storage
