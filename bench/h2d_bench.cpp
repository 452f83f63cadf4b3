// Host -> GPU block uploads (part of `kvtier bench storage`): how close a
// batch of scattered 32 KiB blocks comes to one contiguous copy of the same
// bytes, by method, and what one call per block costs (DESIGN.md section 3).
// Then the link curve a machine profile needs (kvtier calibrate): single
// pinned copies of 4 KiB..32 MiB each way, and both directions at once.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
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

// The single-copy sizes of the link curve that kvtier calibrate writes into a
// machine profile; 32 MiB is h2d_single_copy_32mib (and d2h_copy_32mib).
constexpr uint64_t kCurveBytes[] = {4 << 10, 32 << 10, 256 << 10, 2 << 20};

// "4kib", "2mib": the size in a result name.
std::string size_name(uint64_t bytes) {
  return bytes >= (1 << 20) ? std::to_string(bytes >> 20) + "mib" : std::to_string(bytes >> 10) + "kib";
}

// GB/s of one synchronous pinned copy of `bytes` between the rig's host and
// device bases, each timed sample a run of calls so that a 4 KiB copy is not
// lost in the clock's resolution.
Result<double> single_copy_gbps(ComputeBackend& backend, const H2dRig& rig, uint64_t bytes, bool to_device,
                                const SuiteArgs& args) {
  KVT_ASSERT(bytes <= kBatchBytes, "copy of ", bytes, " bytes exceeds the rig's ", kBatchBytes);
  const BlockCopy copy = to_device ? BlockCopy{rig.host->base(), rig.device->slot_data(0), bytes}
                                   : BlockCopy{rig.device->slot_data(0), rig.host->base(), bytes};
  const std::span<const BlockCopy> one(&copy, 1);
  const auto run = [&] { return to_device ? backend.copy_to_device(one) : backend.copy_to_host(one); };
  KVT_RETURN_IF_ERROR(run());  // a failure is reported, not timed
  const uint64_t calls = std::clamp<uint64_t>((8 << 20) / bytes, 1, 64);
  const Timing t = time_it(
      [&] {
        for (uint64_t i = 0; i < calls; ++i) {
          const Status st = run();
          KVT_ASSERT(st.ok(), "pinned copy failed after a successful check run: ", st.to_string());
        }
      },
      args.quick ? 2 : 5, args.quick ? 7 : 21);
  return static_cast<double>(bytes * calls) / 1e9 / t.median_s;
}

// GB/s of both directions together while a 32 MiB host->device copy stream
// on `up` and a 32 MiB device->host copy stream on `down` (a second backend,
// so a second CUDA stream with its own rig) run at once: bytes moved both
// ways over the wall time of both.
Result<double> duplex_gbps(ComputeBackend& up, const H2dRig& up_rig, ComputeBackend& down, const H2dRig& down_rig,
                           const SuiteArgs& args) {
  const BlockCopy h2d{up_rig.host->base(), up_rig.device->slot_data(0), kBatchBytes};
  const BlockCopy d2h{down_rig.device->slot_data(0), down_rig.host->base(), kBatchBytes};
  KVT_RETURN_IF_ERROR(up.copy_to_device(std::span(&h2d, 1)));
  KVT_RETURN_IF_ERROR(down.copy_to_host(std::span(&d2h, 1)));
  const int copies = args.quick ? 4 : 16;
  std::atomic<bool> failed{false};
  const Timing t = time_it(
      [&] {
        std::thread downloads([&] {
          for (int i = 0; i < copies; ++i)
            if (!down.copy_to_host(std::span(&d2h, 1)).ok()) failed = true;
        });
        for (int i = 0; i < copies; ++i)
          if (!up.copy_to_device(std::span(&h2d, 1)).ok()) failed = true;
        downloads.join();
      },
      1, args.quick ? 3 : 7);
  if (failed) return internal_error("a copy failed while both directions ran after successful check runs");
  return 2.0 * copies * static_cast<double>(kBatchBytes) / 1e9 / t.median_s;
}

// The link curve (single pinned copies by size, each direction) and the
// both-directions figure, all DMA copies (cudaMemcpyBatchAsync of one copy).
Status add_link_curve(Report& report, ComputeBackend& backend, const H2dRig& rig, const SuiteArgs& args) {
  gpu::set_batch_copy_method(backend, gpu::BatchCopyMethod::kMemcpyBatch);
  for (const uint64_t bytes : kCurveBytes) {
    KVT_ASSIGN_OR_RETURN(const double gbps, single_copy_gbps(backend, rig, bytes, true, args));
    report.add("h2d_copy_" + size_name(bytes), gbps, "GB/s", "h2d_single_copy_32mib");
  }
  KVT_ASSIGN_OR_RETURN(const double d2h_32m, single_copy_gbps(backend, rig, kBatchBytes, false, args));
  report.add("d2h_copy_32mib", d2h_32m, "GB/s", "h2d_single_copy_32mib");
  for (const uint64_t bytes : kCurveBytes) {
    KVT_ASSIGN_OR_RETURN(const double gbps, single_copy_gbps(backend, rig, bytes, false, args));
    report.add("d2h_copy_" + size_name(bytes), gbps, "GB/s", "d2h_copy_32mib");
  }
  KVT_ASSIGN_OR_RETURN(auto down, gpu::make_cuda_backend(0));
  KVT_ASSIGN_OR_RETURN(const H2dRig down_rig, make_h2d_rig(*down));
  gpu::set_batch_copy_method(*down, gpu::BatchCopyMethod::kMemcpyBatch);
  KVT_ASSIGN_OR_RETURN(const double duplex, duplex_gbps(backend, rig, *down, down_rig, args));
  report.add("h2d_d2h_duplex_32mib", duplex, "GB/s", "h2d_single_copy_32mib");
  report.set_config("link_curve",
                    "h2d_copy_<size>/d2h_copy_<size>: one synchronous cudaMemcpyBatchAsync of one pinned copy "
                    "between the arenas' bases, runs of up to 64 calls per sample; h2d_d2h_duplex_32mib: bytes "
                    "of both directions per second while 32 MiB h2d copies on one stream and 32 MiB d2h copies "
                    "on a second backend's stream run at once");
  return Status::ok_status();
}

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
  return add_link_curve(report, backend, rig, args);
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
