// The host -> GPU block-copy rig shared by `kvtier bench storage` (h2d_*)
// and `kvtier bench gpu` (gather_blocks): a pinned host arena and a device
// arena of 32 KiB slots, one contiguous 32 MiB copy and a batch of 1024
// scattered blocks of the same bytes, timed the same way.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "harness.h"
#include "kvtier/core/compute_backend.h"
#include "kvtier/storage/device_arena.h"
#include "kvtier/storage/host_arena.h"

namespace kvtier::bench {

inline constexpr uint64_t kH2dSlotBytes = 32 * 1024;
inline constexpr uint32_t kH2dBatchBlocks = 1024;  // 32 MiB per batch, the same bytes as the single copy

struct H2dRig {
  std::unique_ptr<storage::HostArena> host;
  std::unique_ptr<storage::DeviceArena> device;
  std::vector<BlockCopy> single;     // one contiguous 32 MiB copy
  std::vector<BlockCopy> scattered;  // 1024 blocks, random host slot -> random device slot
};

// Arenas of 2048 slots on `backend`, host slots filled with non-zero random words.
Result<H2dRig> make_h2d_rig(ComputeBackend& backend);

// GB/s of one synchronous copy_to_device call over `copies` (per_copy: one
// call per block instead), median of the repeats, timed on the host.
Result<double> h2d_copy_gbps(ComputeBackend& backend, std::span<const BlockCopy> copies, bool per_copy,
                             const SuiteArgs& args);

}  // namespace kvtier::bench
