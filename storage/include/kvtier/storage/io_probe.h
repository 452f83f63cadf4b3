// Whether this machine can run kvtier's NVMe tier: io_uring and O_DIRECT in a
// given directory, checked by doing the real thing on a small temporary file.
#pragma once

#include <optional>
#include <string>

namespace kvtier::storage {

struct IoProbe {
  std::string dir;                   // the directory probed, as given
  bool io_uring = false;             // a ring was set up and a read completed through it
  bool o_direct = false;             // the file system in dir accepted O_DIRECT and an aligned read/write
  // Each failure in order, joined by "; " (the first is the cause), naming
  // the call, path and errno text; empty when both checks passed.
  std::optional<std::string> error;
};

// Creates, writes, reads back and removes a 4 KiB-aligned temporary file in
// dir through io_uring with O_DIRECT. Where the file system refuses O_DIRECT,
// io_uring is still checked on a buffered file. Never throws; failures land
// in error.
IoProbe probe_io(const std::string& dir);

}  // namespace kvtier::storage
