// The CUDA backend against its contract: batched block copies in both
// directions and with both methods land bit-exact in poisoned slots, host
// memory that was not pinned still copies correctly, and OOM is a Status.
// Exits 77 (skipped) without a CUDA build or a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kvtier/gpu/cuda_backend.h"
#include "kvtier/storage/device_arena.h"
#include "kvtier/storage/host_arena.h"
#include "random.h"
#include "skip.h"

using namespace kvtier;
using gpu::BatchCopyMethod;
using storage::DeviceArena;
using storage::HostArena;
using storage::HostArenaOptions;

namespace {

constexpr uint64_t kSlotBytes = 32 * 1024;
constexpr BatchCopyMethod kMethods[] = {BatchCopyMethod::kGatherKernel, BatchCopyMethod::kMemcpyBatch};

const char* method_name(BatchCopyMethod m) {
  return m == BatchCopyMethod::kGatherKernel ? "gather kernel" : "cudaMemcpyBatchAsync";
}

// The backend, or exit 77 with the reason when this machine cannot make one.
std::unique_ptr<ComputeBackend> cuda_or_skip() {
  auto backend = gpu::make_cuda_backend(0);
  test::require(backend.ok(), backend.status().to_string());
  return std::move(backend).value();
}

void fill_random(std::byte* p, uint64_t bytes, std::mt19937_64& gen) {
  for (uint64_t w = 0; w < bytes / 8; ++w) {
    const uint64_t v = gen();
    std::memcpy(p + w * 8, &v, 8);
  }
}

// A pinned host arena, a device arena and a poison block, with every slot
// taken in a random order.
struct Rig {
  std::unique_ptr<HostArena> host;
  std::unique_ptr<DeviceArena> device;
  std::vector<uint32_t> host_slots, device_slots;
  std::byte* poison = nullptr;  // one host slot of 0xFF bytes

  Rig(ComputeBackend& backend, uint32_t host_slot_count, uint32_t device_slot_count, std::mt19937_64& gen) {
    auto h = HostArena::create(backend, HostArenaOptions{.budget_bytes = host_slot_count * kSlotBytes,
                                                         .slot_bytes = kSlotBytes});
    REQUIRE_MESSAGE(h.ok(), h.status().to_string());
    host = std::move(h).value();
    CHECK_MESSAGE(host->describe().find("not pinned") == std::string::npos, host->describe());
    auto d = DeviceArena::create(backend, device_slot_count * kSlotBytes, kSlotBytes);
    REQUIRE_MESSAGE(d.ok(), d.status().to_string());
    device = std::move(d).value();
    poison = host->slot_data(*host->allocate());
    std::memset(poison, 0xFF, kSlotBytes);
    while (const auto s = host->allocate()) host_slots.push_back(*s);
    while (const auto s = device->allocate()) device_slots.push_back(*s);
    std::shuffle(host_slots.begin(), host_slots.end(), gen);
    std::shuffle(device_slots.begin(), device_slots.end(), gen);
  }

  // Overwrites the first `count` device slots with 0xFF so that a slot the
  // copy misses cannot pass for a written one.
  void poison_device(ComputeBackend& backend, size_t count) {
    std::vector<BlockCopy> copies;
    for (size_t i = 0; i < count; ++i) copies.push_back({poison, device->slot_data(device_slots[i]), kSlotBytes});
    REQUIRE(backend.copy_to_device(copies).ok());
  }
};

// Sends `count` random blocks from scattered host slots to scattered device
// slots and back into other, poisoned host slots; counts blocks that differ.
size_t round_trip(ComputeBackend& backend, Rig& rig, size_t count, std::mt19937_64& gen) {
  REQUIRE(2 * count <= rig.host_slots.size());
  rig.poison_device(backend, count);
  std::vector<BlockCopy> up, down;
  for (size_t i = 0; i < count; ++i) {
    std::byte* src = rig.host->slot_data(rig.host_slots[i]);
    std::byte* dev = rig.device->slot_data(rig.device_slots[i]);
    std::byte* back = rig.host->slot_data(rig.host_slots[count + i]);
    fill_random(src, kSlotBytes, gen);
    std::memset(back, 0xFF, kSlotBytes);
    up.push_back({src, dev, kSlotBytes});
    down.push_back({dev, back, kSlotBytes});
  }
  const Status up_status = backend.copy_to_device(up);
  REQUIRE_MESSAGE(up_status.ok(), up_status.to_string());
  const Status down_status = backend.copy_to_host(down);
  REQUIRE_MESSAGE(down_status.ok(), down_status.to_string());
  size_t wrong = 0;
  for (size_t i = 0; i < count; ++i) wrong += std::memcmp(up[i].src, down[i].dst, kSlotBytes) != 0;
  return wrong;
}

}  // namespace

TEST_CASE("cuda backend: name, memory info and an empty batch") {
  auto backend = cuda_or_skip();
  MESSAGE("backend: ", backend->name());
  CHECK(backend->name().starts_with("cuda:0 ("));
  CHECK_FALSE(backend->device_is_host());
  const auto info = backend->device_memory_info();
  REQUIRE(info.ok());
  CHECK(info->second > 0);
  CHECK(info->first <= info->second);
  CHECK(backend->copy_to_device({}).ok());
  CHECK(backend->copy_to_host({}).ok());
}

TEST_CASE("cuda backend: scattered 32 KiB blocks, odd counts, both methods, bit-exact both ways") {
  auto backend = cuda_or_skip();
  auto gen = test::rng(1);
  Rig rig(*backend, 2 * 1024 + 1, 2048, gen);
  MESSAGE("host arena: ", rig.host->describe());
  for (BatchCopyMethod method : kMethods) {
    gpu::set_batch_copy_method(*backend, method);
    for (size_t count : {size_t{1}, size_t{17}, size_t{97}, size_t{1024}}) {
      CAPTURE(method_name(method));
      CAPTURE(count);
      CHECK(round_trip(*backend, rig, count, gen) == 0);
      // A fresh permutation each round, so slots pair differently.
      std::shuffle(rig.host_slots.begin(), rig.host_slots.end(), gen);
      std::shuffle(rig.device_slots.begin(), rig.device_slots.end(), gen);
    }
  }
}

TEST_CASE("cuda backend: one contiguous 32 MiB copy, both methods") {
  auto backend = cuda_or_skip();
  auto gen = test::rng(2);
  constexpr uint64_t kBytes = uint64_t{32} << 20;
  auto host = HostArena::create(*backend, HostArenaOptions{.budget_bytes = 2 * kBytes, .slot_bytes = kBytes});
  REQUIRE_MESSAGE(host.ok(), host.status().to_string());
  auto device = DeviceArena::create(*backend, kBytes, kBytes);
  REQUIRE_MESSAGE(device.ok(), device.status().to_string());
  std::byte* src = (*host)->slot_data(0);
  std::byte* back = (*host)->slot_data(1);
  std::byte* dev = (*device)->slot_data(0);
  for (BatchCopyMethod method : kMethods) {
    CAPTURE(method_name(method));
    gpu::set_batch_copy_method(*backend, method);
    fill_random(src, kBytes, gen);
    std::memset(back, 0xFF, kBytes);
    const BlockCopy up{src, dev, kBytes}, down{dev, back, kBytes};
    REQUIRE(backend->copy_to_device({&up, 1}).ok());
    REQUIRE(backend->copy_to_host({&down, 1}).ok());
    CHECK(std::memcmp(src, back, kBytes) == 0);
  }
}

TEST_CASE("cuda backend: host memory that was not pinned takes the slow path and is still correct") {
  auto backend = cuda_or_skip();
  auto gen = test::rng(3);
  constexpr size_t kBlocks = 40;
  Rig rig(*backend, 2 * kBlocks + 1, kBlocks, gen);
  // Plain heap memory, deliberately not through pin_host.
  std::vector<std::byte> unpinned_src(kBlocks * kSlotBytes), unpinned_back(kBlocks * kSlotBytes);
  for (BatchCopyMethod method : kMethods) {
    CAPTURE(method_name(method));
    gpu::set_batch_copy_method(*backend, method);
    rig.poison_device(*backend, kBlocks);
    std::vector<BlockCopy> up, down;
    for (size_t i = 0; i < kBlocks; ++i) {
      // Every other block comes from unpinned memory: the batch mixes both paths.
      const bool pinned = i % 2 == 0;
      std::byte* src = pinned ? rig.host->slot_data(rig.host_slots[i]) : unpinned_src.data() + i * kSlotBytes;
      std::byte* back = pinned ? rig.host->slot_data(rig.host_slots[kBlocks + i]) : unpinned_back.data() + i * kSlotBytes;
      fill_random(src, kSlotBytes, gen);
      std::memset(back, 0xFF, kSlotBytes);
      up.push_back({src, rig.device->slot_data(rig.device_slots[i]), kSlotBytes});
      down.push_back({rig.device->slot_data(rig.device_slots[i]), back, kSlotBytes});
    }
    REQUIRE(backend->copy_to_device(up).ok());
    REQUIRE(backend->copy_to_host(down).ok());
    size_t wrong = 0;
    for (size_t i = 0; i < kBlocks; ++i) wrong += std::memcmp(up[i].src, down[i].dst, kSlotBytes) != 0;
    CHECK(wrong == 0);
  }
}

TEST_CASE("cuda backend: the gather kernel refuses copies that are not 16-byte aligned") {
  auto backend = cuda_or_skip();
  auto gen = test::rng(4);
  Rig rig(*backend, 4, 4, gen);
  std::byte* src = rig.host->slot_data(rig.host_slots[0]);
  const BlockCopy odd{src + 8, rig.device->slot_data(rig.device_slots[0]), 4096};
  const Status gather = backend->copy_to_device({&odd, 1});
  CHECK(gather.code() == StatusCode::kInvalidArgument);
  CHECK_MESSAGE(gather.message().find("16-byte") != std::string::npos, gather.message());
  // The copy engine has no such rule.
  gpu::set_batch_copy_method(*backend, BatchCopyMethod::kMemcpyBatch);
  fill_random(src, kSlotBytes, gen);
  std::byte* back = rig.host->slot_data(rig.host_slots[1]);
  const BlockCopy down{rig.device->slot_data(rig.device_slots[0]), back, 4096};
  REQUIRE(backend->copy_to_device({&odd, 1}).ok());
  REQUIRE(backend->copy_to_host({&down, 1}).ok());
  CHECK(std::memcmp(src + 8, back, 4096) == 0);
}

TEST_CASE("cuda backend: out of device memory is a Status naming the bytes asked") {
  auto backend = cuda_or_skip();
  if (test::quick_sweep()) {
    MESSAGE("skipped under KVTIER_TEST_QUICK (the sanitizer sweep): it provokes a CUDA API error on purpose");
    return;
  }
  constexpr uint64_t kPebibyte = uint64_t{1} << 50;
  const auto memory = backend->allocate_device(kPebibyte);
  REQUIRE_FALSE(memory.ok());
  CHECK(memory.status().code() == StatusCode::kOutOfMemory);
  const std::string& m = memory.status().message();
  CHECK_MESSAGE(m.find(std::to_string(kPebibyte)) != std::string::npos, m);
  CHECK_MESSAGE(m.find("free of") != std::string::npos, m);
  // The failure leaves the device usable.
  const auto small = backend->allocate_device(1 << 20);
  CHECK(small.ok());
}
