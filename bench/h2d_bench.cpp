// Host -> GPU block uploads (part of `kvtier bench storage`): how close a
// batch of scattered 32 KiB blocks comes to one contiguous copy of the same
// bytes, by method, and what one call per block costs (DESIGN.md section 3).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "harness.h"
#include "kvtier/core/assert.h"
#include "kvtier/gpu/cuda_backend.h"
#include "kvtier/storage/device_arena.h"
#include "kvtier/storage/host_arena.h"
#include "h2d_rig.h"
#include "suites.h"

namespace kvtier::bench {
namespace {

constexpr uint64_t kSlotBytes = kH2dSlotBytes;
constexpr uint32_t kSlots = 2048;
constexpr uint32_t kBatchBlocks = kH2dBatchBlocks;
constexpr uint64_t kBatchBytes = kBatchBlocks * kSlotBytes;

// Random words with no zero bytes: zero pages and zero data can take
// shortcuts that real KV blocks never get.
void fill_nonzero(std::byte* p, uint64_t bytes, std::mt19937_64& gen) {
  for (uint64_t w = 0; w < bytes / 8; ++w) {
    const uint64_t v = gen() | 0x0101010101010101ull;
    std::memcpy(p + w * 8, &v, 8);
  }
}


}  // namespace

Result<H2dRig> make_h2d_rig(ComputeBackend& backend) {
  H2dRig rig;
  KVT_ASSIGN_OR_RETURN(rig.host, storage::HostArena::create(backend, storage::HostArenaOptions{
                                                                         .budget_bytes = kSlots * kSlotBytes,
                                                                         .slot_bytes = kSlotBytes}));
  KVT_ASSIGN_OR_RETURN(rig.device, storage::DeviceArena::create(backend, kSlots * kSlotBytes, kSlotBytes));
  std::mt19937_64 gen(20261128);
  fill_nonzero(rig.host->base(), rig.host->bytes(), gen);
  std::vector<uint32_t> host_slots(kSlots), device_slots(kSlots);
  for (uint32_t i = 0; i < kSlots; ++i) host_slots[i] = device_slots[i] = i;
  std::shuffle(host_slots.begin(), host_slots.end(), gen);
  std::shuffle(device_slots.begin(), device_slots.end(), gen);
  // Slot 0 starts each arena, so these are the two bases.
  rig.single.push_back({rig.host->base(), rig.device->slot_data(0), kBatchBytes});
  for (uint32_t i = 0; i < kBatchBlocks; ++i) {
    rig.scattered.push_back({rig.host->slot_data(host_slots[i]), rig.device->slot_data(device_slots[i]), kSlotBytes});
  }
  return rig;
}

// GB/s of one call of copy_to_device over `copies`, timed on the host around
// the synchronous call; per_copy issues one call per block instead.
Result<double> h2d_copy_gbps(ComputeBackend& backend, std::span<const BlockCopy> copies, bool per_copy,
                             const SuiteArgs& args) {
  const auto run = [&] {
    if (!per_copy) return backend.copy_to_device(copies);
    for (size_t i = 0; i < copies.size(); ++i) KVT_RETURN_IF_ERROR(backend.copy_to_device(copies.subspan(i, 1)));
    return Status::ok_status();
  };
  // One checked run first, so that a failure is reported instead of timed.
  KVT_RETURN_IF_ERROR(run());
  uint64_t bytes = 0;
  for (const BlockCopy& c : copies) bytes += c.bytes;
  const Timing t = time_it(
      [&] {
        const Status st = run();
        KVT_ASSERT(st.ok(), "h2d copy failed after a successful check run: ", st.to_string());
      },
      args.quick ? 2 : 5, args.quick ? 7 : 21);
  return static_cast<double>(bytes) / 1e9 / t.median_s;
}


namespace {

Status add_results(Report& report, ComputeBackend& backend, const H2dRig& rig, const SuiteArgs& args) {
  using gpu::BatchCopyMethod;
  // The ceiling is one DMA-engine copy of 32 contiguous MiB: what the link
  // gives at its best. cudaMemcpyBatchAsync of one copy is exactly that.
  gpu::set_batch_copy_method(backend, BatchCopyMethod::kMemcpyBatch);
  KVT_ASSIGN_OR_RETURN(const double single, h2d_copy_gbps(backend, rig.single, false, args));
  report.add("h2d_single_copy_32mib", single, "GB/s");
  gpu::set_batch_copy_method(backend, BatchCopyMethod::kGatherKernel);
  KVT_ASSIGN_OR_RETURN(const double gather, h2d_copy_gbps(backend, rig.scattered, false, args));
  report.add("h2d_block_batch", gather, "GB/s", "h2d_single_copy_32mib");
  gpu::set_batch_copy_method(backend, BatchCopyMethod::kMemcpyBatch);
  KVT_ASSIGN_OR_RETURN(const double batch, h2d_copy_gbps(backend, rig.scattered, false, args));
  report.add("h2d_block_batch_memcpybatch", batch, "GB/s", "h2d_single_copy_32mib");
  // One call per block, each a single DMA copy and a wait: the cudaMemcpy
  // loop that batching replaces.
  KVT_ASSIGN_OR_RETURN(const double per_copy, h2d_copy_gbps(backend, rig.scattered, true, args));
  report.add("h2d_block_per_copy", per_copy, "GB/s", "h2d_single_copy_32mib");
  return Status::ok_status();
}

}  // namespace

std::string add_h2d_results(Report& report, const SuiteArgs& args) {
  auto backend = gpu::make_cuda_backend(0);
  if (!backend.ok()) return "no GPU: " + backend.status().message();
  auto rig = make_h2d_rig(**backend);
  if (!rig.ok()) return "h2d skipped: " + rig.status().message();
  const Status st = add_results(report, **backend, *rig, args);
  gpu::set_batch_copy_method(**backend, gpu::BatchCopyMethod::kGatherKernel);
  if (!st.ok()) return "h2d failed: " + st.message();
  return std::string((*backend)->name()) + ", host arena " + rig->host->describe();
}

}  // namespace kvtier::bench
