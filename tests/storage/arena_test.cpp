#include <doctest/doctest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "kvtier/cpu/cpu_backend.h"
#include "kvtier/storage/device_arena.h"
#include "kvtier/storage/host_arena.h"
#include "random.h"

using namespace kvtier;
using kvtier::storage::DeviceArena;
using kvtier::storage::HostArena;
using kvtier::storage::HostArenaOptions;

namespace {

constexpr uint64_t kSlotBytes = 32 * 1024;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Every 8-byte word of slot s holds s * 2^32 + word index: an overlap or a
// stale slot shows as a wrong word.
void fill_pattern(std::byte* p, uint64_t bytes, uint32_t slot) {
  for (uint64_t w = 0; w < bytes / 8; ++w) {
    const uint64_t v = (uint64_t{slot} << 32) | w;
    std::memcpy(p + w * 8, &v, 8);
  }
}

bool has_pattern(const std::byte* p, uint64_t bytes, uint32_t slot) {
  for (uint64_t w = 0; w < bytes / 8; ++w) {
    uint64_t v = 0;
    std::memcpy(&v, p + w * 8, 8);
    if (v != ((uint64_t{slot} << 32) | w)) return false;
  }
  return true;
}

void fill_random(std::byte* p, uint64_t bytes, std::mt19937_64& gen) {
  for (uint64_t w = 0; w < bytes / 8; ++w) {
    const uint64_t v = gen();
    std::memcpy(p + w * 8, &v, 8);
  }
}

std::unique_ptr<HostArena> make_host_arena(ComputeBackend& backend, uint64_t budget_bytes) {
  auto arena = HostArena::create(backend, HostArenaOptions{.budget_bytes = budget_bytes, .slot_bytes = kSlotBytes});
  REQUIRE_MESSAGE(arena.ok(), arena.status().to_string());
  return std::move(arena).value();
}

// Takes every slot of an arena, in allocation order.
template <class Arena>
std::vector<uint32_t> take_all(Arena& arena) {
  std::vector<uint32_t> slots;
  while (const auto s = arena.allocate()) slots.push_back(*s);
  return slots;
}

}  // namespace

TEST_CASE("host arena slots are 4 KiB aligned, distinct and do not overlap") {
  auto backend = cpu::make_cpu_backend();
  // 4 MiB + 5 bytes: 128 whole slots, the odd bytes are not used.
  auto arena = make_host_arena(*backend, (uint64_t{4} << 20) + 5);
  CHECK(arena->capacity() == 128);
  CHECK(arena->bytes() == 128 * kSlotBytes);
  CHECK(contains(arena->describe(), "128 slots of 32 KiB"));
  MESSAGE("host arena: ", arena->describe());
  const std::vector<uint32_t> slots = take_all(*arena);
  REQUIRE(slots.size() == 128);
  std::set<std::byte*> addresses;
  for (uint32_t s : slots) {
    std::byte* p = arena->slot_data(s);
    CHECK(reinterpret_cast<uintptr_t>(p) % 4096 == 0);
    CHECK(addresses.insert(p).second);
    fill_pattern(p, kSlotBytes, s);
  }
  for (uint32_t s : slots) CHECK(has_pattern(arena->slot_data(s), kSlotBytes, s));
  for (uint32_t s : slots) arena->free(s);
  CHECK(arena->free_count() == 128);
}

TEST_CASE("host arena: a budget beyond MemAvailable fails at create, naming host_bytes") {
  auto backend = cpu::make_cpu_backend();
  const auto arena =
      HostArena::create(*backend, HostArenaOptions{.budget_bytes = uint64_t{64} << 40, .slot_bytes = kSlotBytes});
  REQUIRE_FALSE(arena.ok());
  CHECK(arena.status().code() == StatusCode::kOutOfMemory);
  const std::string& m = arena.status().message();
  CHECK_MESSAGE(contains(m, "host_bytes=64 TiB exceeds the"), m);
  CHECK_MESSAGE(contains(m, "available; lower --host-bytes"), m);
}

TEST_CASE("host arena: a budget under one slot or an unaligned slot is invalid") {
  auto backend = cpu::make_cpu_backend();
  const auto small = HostArena::create(*backend, HostArenaOptions{.budget_bytes = 16384, .slot_bytes = kSlotBytes});
  REQUIRE_FALSE(small.ok());
  CHECK(small.status().code() == StatusCode::kInvalidArgument);
  CHECK_MESSAGE(contains(small.status().message(), "host_bytes=16 KiB"), small.status().message());
  CHECK_MESSAGE(contains(small.status().message(), "32 KiB"), small.status().message());

  const auto odd = HostArena::create(*backend, HostArenaOptions{.budget_bytes = 1 << 20, .slot_bytes = 5000});
  REQUIRE_FALSE(odd.ok());
  CHECK(odd.status().code() == StatusCode::kInvalidArgument);
  CHECK(contains(odd.status().message(), "slot_bytes=5000"));
}

TEST_CASE("host arena: a NUMA node that does not exist is an error at create") {
  auto backend = cpu::make_cpu_backend();
  const auto arena = HostArena::create(
      *backend, HostArenaOptions{.budget_bytes = 1 << 20, .slot_bytes = kSlotBytes, .numa_node = 4095});
  REQUIRE_FALSE(arena.ok());
  CHECK(arena.status().code() == StatusCode::kInvalidArgument);
  CHECK(contains(arena.status().message(), "numa_node=4095"));
}

TEST_CASE("host arena on NUMA node 0 and without huge pages") {
  auto backend = cpu::make_cpu_backend();
  auto arena = HostArena::create(*backend, HostArenaOptions{.budget_bytes = 2 << 20, .slot_bytes = kSlotBytes,
                                                            .numa_node = 0, .try_huge_pages = false});
  REQUIRE_MESSAGE(arena.ok(), arena.status().to_string());
  CHECK(contains((*arena)->describe(), "4 KiB pages"));
  CHECK(contains((*arena)->describe(), "NUMA node 0"));
}

TEST_CASE("host arena: a pin that fails leaves the arena working, unpinned, and says why") {
  rlimit saved{};
  REQUIRE(getrlimit(RLIMIT_MEMLOCK, &saved) == 0);
  rlimit tiny = saved;
  tiny.rlim_cur = 0;
  REQUIRE(setrlimit(RLIMIT_MEMLOCK, &tiny) == 0);
  auto backend = cpu::make_cpu_backend();
  auto arena = make_host_arena(*backend, 1 << 20);
  REQUIRE(setrlimit(RLIMIT_MEMLOCK, &saved) == 0);
  const std::string& text = arena->describe();
  if (contains(text, "not pinned")) {
    CHECK_MESSAGE(contains(text, "RLIMIT_MEMLOCK"), text);
  } else {
    // Root with CAP_IPC_LOCK locks memory whatever the limit says.
    MESSAGE("mlock ignored RLIMIT_MEMLOCK here (CAP_IPC_LOCK): ", text);
  }
  const uint32_t s = *arena->allocate();
  fill_pattern(arena->slot_data(s), kSlotBytes, s);
  CHECK(has_pattern(arena->slot_data(s), kSlotBytes, s));
}

TEST_CASE("device arena on the CPU backend: aligned distinct slots and accounting") {
  auto backend = cpu::make_cpu_backend(uint64_t{64} << 20);
  {
    auto arena = DeviceArena::create(*backend, (uint64_t{8} << 20) + 100, kSlotBytes);
    REQUIRE_MESSAGE(arena.ok(), arena.status().to_string());
    CHECK((*arena)->capacity() == 256);
    CHECK(backend->device_memory_info()->first == (uint64_t{56} << 20));
    const std::vector<uint32_t> slots = take_all(**arena);
    REQUIRE(slots.size() == 256);
    for (uint32_t s : slots) {
      CHECK(reinterpret_cast<uintptr_t>((*arena)->slot_data(s)) % 4096 == 0);
      fill_pattern((*arena)->slot_data(s), kSlotBytes, s);
    }
    for (uint32_t s : slots) CHECK(has_pattern((*arena)->slot_data(s), kSlotBytes, s));
  }
  CHECK(backend->device_memory_info()->first == (uint64_t{64} << 20));
}

TEST_CASE("device arena: out of device memory names the bytes asked and free") {
  auto backend = cpu::make_cpu_backend(uint64_t{1} << 20);
  const auto arena = DeviceArena::create(*backend, uint64_t{64} << 20, kSlotBytes);
  REQUIRE_FALSE(arena.ok());
  CHECK(arena.status().code() == StatusCode::kOutOfMemory);
  const std::string& m = arena.status().message();
  CHECK_MESSAGE(contains(m, "67108864 bytes"), m);
  CHECK_MESSAGE(contains(m, "1 MiB free"), m);
  CHECK_MESSAGE(contains(m, "2048 slots of 32 KiB"), m);

  const auto tiny = DeviceArena::create(*backend, 4096, kSlotBytes);
  REQUIRE_FALSE(tiny.ok());
  CHECK(tiny.status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("cpu backend: 1000 random 32 KiB blocks to scattered device slots and back, bit-exact") {
  auto backend = cpu::make_cpu_backend();
  auto host = make_host_arena(*backend, 1024 * kSlotBytes);
  auto device = DeviceArena::create(*backend, 1024 * kSlotBytes, kSlotBytes);
  REQUIRE_MESSAGE(device.ok(), device.status().to_string());
  auto gen = test::rng(42);
  std::vector<uint32_t> host_slots = take_all(*host), device_slots = take_all(**device);
  std::shuffle(host_slots.begin(), host_slots.end(), gen);
  std::shuffle(device_slots.begin(), device_slots.end(), gen);
  constexpr size_t kBlocks = 1000;
  std::vector<BlockCopy> up(kBlocks), down(kBlocks);
  std::vector<std::byte> back(kBlocks * kSlotBytes, std::byte{0xFF});  // poisoned
  for (size_t i = 0; i < kBlocks; ++i) {
    std::byte* h = host->slot_data(host_slots[i]);
    std::byte* d = (*device)->slot_data(device_slots[i]);
    fill_random(h, kSlotBytes, gen);
    std::memset(d, 0xFF, kSlotBytes);
    up[i] = BlockCopy{h, d, kSlotBytes};
    down[i] = BlockCopy{d, back.data() + i * kSlotBytes, kSlotBytes};
  }
  REQUIRE(backend->copy_to_device(up).ok());
  REQUIRE(backend->copy_to_host(down).ok());
  size_t mismatches = 0;
  for (size_t i = 0; i < kBlocks; ++i) {
    mismatches += std::memcmp(host->slot_data(host_slots[i]), back.data() + i * kSlotBytes, kSlotBytes) != 0;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("cpu backend: small batches, a single block and an empty batch") {
  auto backend = cpu::make_cpu_backend();
  CHECK(backend->name() == "cpu");
  CHECK(backend->device_is_host());
  for (size_t count : {size_t{0}, size_t{1}, size_t{17}}) {
    auto gen = test::rng(count);
    std::vector<std::byte> src(count * 4096 + 1), dst(count * 4096 + 1, std::byte{0});
    fill_random(src.data(), src.size() - 1, gen);
    std::vector<BlockCopy> copies;
    for (size_t i = 0; i < count; ++i) copies.push_back({src.data() + i * 4096, dst.data() + i * 4096, 4096});
    REQUIRE(backend->copy_to_device(copies).ok());
    CHECK(std::memcmp(src.data(), dst.data(), count * 4096) == 0);
  }
}
