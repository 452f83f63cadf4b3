#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "kvtier/storage/io_probe.h"
#include "skip.h"

namespace {

namespace fs = std::filesystem;
using kvtier::storage::IoProbe;
using kvtier::storage::probe_io;

// A fresh directory under parent, removed with everything in it at the end.
class TempDir {
 public:
  explicit TempDir(const std::string& parent) {
    std::string tmpl = parent + "/kvtier-io-probe-test-XXXXXX";
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }  // "" if mkdtemp failed

 private:
  std::string path_;
};

// The probe promises an error exactly when one of its checks failed.
void check_consistent(const IoProbe& p) {
  CAPTURE(p.error.value_or("(none)"));
  CHECK(p.error.has_value() == !(p.io_uring && p.o_direct));
  if (p.error) CHECK(!p.error->empty());
}

// The probe must unlink its file even when the open half-failed.
bool is_empty_dir(const std::string& dir) { return fs::is_empty(dir); }

// An O_DIRECT open and one aligned 4 KiB write, done here without the probe.
bool direct_io_works(const std::string& dir) {
  const std::string path = dir + "/direct-check";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_DIRECT, 0600);
  ::unlink(path.c_str());
  if (fd < 0) return false;
  void* buf = std::aligned_alloc(4096, 4096);
  std::memset(buf, 0x5a, 4096);
  const bool wrote = ::pwrite(fd, buf, 4096, 0) == 4096;
  std::free(buf);
  ::close(fd);
  return wrote;
}

}  // namespace

TEST_CASE("probe_io of a missing directory names it and sets neither flag") {
  const std::string dir = "/nonexistent-kvtier-" + std::to_string(getpid()) + "/sub";
  const IoProbe p = probe_io(dir);
  CHECK(p.dir == dir);
  CHECK(!p.io_uring);
  CHECK(!p.o_direct);
  REQUIRE(p.error.has_value());
  CHECK(p.error->find(dir) != std::string::npos);
  CHECK(p.error->find(std::strerror(ENOENT)) != std::string::npos);
}

TEST_CASE("probe_io of a regular file instead of a directory fails cleanly") {
  const TempDir tmp("/tmp");
  REQUIRE(!tmp.path().empty());
  const std::string file = tmp.path() + "/not-a-dir";
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT, 0600);
  REQUIRE(fd >= 0);
  ::close(fd);
  const IoProbe p = probe_io(file);
  CHECK(!p.io_uring);
  CHECK(!p.o_direct);
  REQUIRE(p.error.has_value());
  CHECK(p.error->find(file) != std::string::npos);
}

TEST_CASE("probe_io of a fresh directory under /tmp is consistent and leaves nothing") {
  const TempDir tmp("/tmp");
  REQUIRE(!tmp.path().empty());
  const IoProbe p = probe_io(tmp.path());
  MESSAGE("/tmp: io_uring=", p.io_uring, " o_direct=", p.o_direct, " error=", p.error.value_or("(none)"));
  check_consistent(p);
  CHECK(p.o_direct == direct_io_works(tmp.path()));
  CHECK(is_empty_dir(tmp.path()));
}

TEST_CASE("probe_io on tmpfs agrees with an independent O_DIRECT attempt") {
  if (!fs::is_directory("/dev/shm")) {
    MESSAGE("no /dev/shm: tmpfs case not run");
    return;
  }
  const TempDir shm("/dev/shm");
  REQUIRE(!shm.path().empty());
  const IoProbe p = probe_io(shm.path());
  MESSAGE("/dev/shm: io_uring=", p.io_uring, " o_direct=", p.o_direct, " error=", p.error.value_or("(none)"));
  check_consistent(p);
  // tmpfs accepts O_DIRECT from Linux 6.6 on and refuses it (EINVAL) before.
  CHECK(p.o_direct == direct_io_works(shm.path()));
  if (!p.o_direct) {
    REQUIRE(p.error.has_value());
    CHECK(p.error->find("O_DIRECT") != std::string::npos);
  }
  CHECK(is_empty_dir(shm.path()));
}

// Last in the file: require() exits the process when io_uring is missing, and
// doctest runs the cases in file order, so every case above has run by then.
TEST_CASE("probe_io reads through io_uring where the kernel allows it") {
  const TempDir tmp("/tmp");
  REQUIRE(!tmp.path().empty());
  const IoProbe p = probe_io(tmp.path());
  // Skip only when the kernel refused the ring (ENOSYS, EPERM under
  // seccomp); a ring that was set up but failed to read is a failure.
  const bool refused = !p.io_uring && p.error &&
                       p.error->find("io_uring_queue_init") != std::string::npos;
  kvtier::test::require(!refused, "io_uring unavailable: " + p.error.value_or(""));
  CHECK(p.io_uring);
  check_consistent(p);
  // With a working ring, any error left can only be about O_DIRECT.
  if (p.error) CHECK(p.error->find("io_uring") == std::string::npos);
  CHECK(is_empty_dir(tmp.path()));
}
