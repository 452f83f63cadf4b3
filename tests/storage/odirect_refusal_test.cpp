// A file system that refuses O_DIRECT (ramfs, mounted in a private mount
// namespace): creating a context file there is an error naming the path unless
// buffered I/O is allowed explicitly, and then it works and says so. Needs
// root (or CAP_SYS_ADMIN) for the mount; reports skipped where that fails.
#include <doctest/doctest.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "kvtier/storage/block_file.h"
#include "skip.h"

using namespace kvtier;
using namespace kvtier::storage;

namespace {

// Mounts a fresh ramfs in a private namespace; exits 77 when the machine does not allow it.
std::string ramfs_dir() {
  const bool ns = ::unshare(CLONE_NEWNS) == 0 && ::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0;
  test::require(ns, std::string("cannot make a private mount namespace: ") + std::strerror(errno));
  char tmpl[] = "/tmp/kvtier_ramfs_XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  test::require(::mount("ramfs", tmpl, "ramfs", 0, nullptr) == 0,
                std::string("cannot mount ramfs: ") + std::strerror(errno));
  return tmpl;
}

FileGeometry small_geometry() { return FileGeometry{ModelShape{1, 2, 1, 64, DType::kBf16}, 64, 8}; }

}  // namespace

TEST_CASE("O_DIRECT refused: an error naming the path, or buffered I/O when allowed") {
  const std::string dir = ramfs_dir();
  const std::string path = dir + "/ctx.kvt";
  const auto refused = BlockFile::create(path, small_geometry(), UringOptions{});
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().message().find(path) != std::string::npos);
  CHECK(refused.status().message().find("refuses O_DIRECT") != std::string::npos);
  CHECK(std::filesystem::is_empty(dir));  // nothing half-made is left behind

  UringOptions buffered;
  buffered.allow_buffered = true;
  auto file = BlockFile::create(path, small_geometry(), buffered);
  REQUIRE_MESSAGE(file.ok(), file.status().to_string());
  CHECK((*file)->device().describe().find("buffered") != std::string::npos);
  const uint64_t slot = small_geometry().slot_bytes();
  auto* buf = static_cast<std::byte*>(std::aligned_alloc(4096, 2 * slot));
  for (uint64_t i = 0; i < slot; ++i) buf[i] = static_cast<std::byte>(i * 7 + 3);
  REQUIRE((*file)->write_blocks(std::vector<BlockIo>{{5, buf}}).ok());
  REQUIRE((*file)->read_blocks(std::vector<BlockIo>{{5, buf + slot}}).ok());
  CHECK(std::memcmp(buf, buf + slot, slot) == 0);
  std::free(buf);
  file = Result<std::unique_ptr<BlockFile>>(internal_error("closed"));
  ::umount(dir.c_str());
  std::filesystem::remove_all(dir);
}
