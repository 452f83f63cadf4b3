// The tiered store end to end: a 1M-token context of a small shape written
// through budgets that force all three tiers, read back bit-exact through
// every path, reopened and verified again; the same against the
// fault-injecting device with faults on (errors surface, never a wrong byte).
#include <doctest/doctest.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <functional>
#include <thread>
#include <numeric>
#include <vector>

#include "kvtier/cpu/cpu_backend.h"
#include "kvtier/storage/io_probe.h"
#include "kvtier/storage/tiered_store.h"
#include "random.h"
#include "skip.h"

using namespace kvtier;
using namespace kvtier::storage;

namespace {

constexpr uint64_t kMiB = 1 << 20;

// 2 layers x 2 KV heads x head dim 64, 64-token chunks: 16 KiB blocks.
StoreConfig small_config(uint64_t max_tokens, uint64_t gpu_bytes, uint64_t host_bytes) {
  StoreConfig c;
  c.shape = ModelShape{2, 8, 2, 64, DType::kBf16};
  c.policy = SparsityPolicy{};
  c.max_tokens = max_tokens;
  c.budgets = TierBudgets{gpu_bytes, host_bytes, 0};
  return c;
}

FileGeometry file_geometry(const StoreConfig& c) {
  const BlockGeometry g(c.shape, c.policy.chunk_tokens);
  return FileGeometry{c.shape, c.policy.chunk_tokens, g.chunks_for(c.max_tokens)};
}

// Contents of version `v` of block `b`: a splitmix64 stream, so 1 GiB of
// expected data never has to be held.
void fill_block(std::byte* dst, uint64_t bytes, uint32_t b, uint32_t v) {
  uint64_t x = test::seed() ^ (uint64_t{b} << 20) ^ (uint64_t{v} << 52);
  for (uint64_t i = 0; i < bytes; i += 8) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(dst + i, &z, 8);
  }
}

bool block_matches(const std::byte* p, uint64_t bytes, uint32_t b, uint32_t v = 0) {
  thread_local std::vector<std::byte> expect;
  expect.resize(bytes);
  fill_block(expect.data(), bytes, b, v);
  return std::memcmp(p, expect.data(), bytes) == 0;
}

// Writes every block (version 0) in batches; retries batches that failed
// (faults), at most `attempts` times each. Returns the errors surfaced.
uint64_t write_all(TieredStore& store, int attempts = 1) {
  const uint64_t bytes = store.block_bytes();
  const uint32_t batch = 64;
  std::vector<std::byte> data(batch * bytes);
  uint64_t errors = 0;
  for (uint32_t first = 0; first < store.block_count(); first += batch) {
    const uint32_t n = std::min(batch, store.block_count() - first);
    std::vector<TieredStore::BlockWrite> writes;
    for (uint32_t k = 0; k < n; ++k) {
      fill_block(data.data() + k * bytes, bytes, first + k, 0);
      writes.push_back({first + k, data.data() + k * bytes});
    }
    Status st = store.write_home(writes);
    for (int a = 1; !st.ok() && a < attempts; ++a) {
      ++errors;
      st = store.write_home(writes);
    }
    REQUIRE_MESSAGE(st.ok(), st.to_string());
  }
  return errors;
}

// Makes [first, first+n) resident in `tier`, retrying a failed ticket (faults).
Status prefetch_retrying(TieredStore& store, const std::vector<uint32_t>& blocks, Tier tier, int attempts,
                         uint64_t* errors) {
  Status st;
  for (int a = 0; a < attempts; ++a) {
    st = store.wait(store.prefetch(blocks, tier));
    if (st.ok()) return st;
    ++*errors;
  }
  return st;
}

// Reads every block through `tier` (host: pinned host copy; gpu: the slot
// copied back with the backend) and checks every byte.
uint64_t verify_through(TieredStore& store, Tier tier, int attempts = 1) {
  const uint64_t bytes = store.block_bytes();
  const uint32_t batch = tier == Tier::kGpu ? 1024 : 512;
  std::vector<std::byte> back(bytes);
  uint64_t errors = 0, wrong = 0;
  for (uint32_t first = 0; first < store.block_count(); first += batch) {
    std::vector<uint32_t> blocks;
    for (uint32_t b = first; b < std::min(store.block_count(), first + batch); ++b) blocks.push_back(b);
    const Status st = prefetch_retrying(store, blocks, tier, attempts, &errors);
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    for (uint32_t b : blocks) {
      Result<BlockPin> pin = store.pin(b, tier);
      REQUIRE_MESSAGE(pin.ok(), pin.status().to_string());
      const BlockCopy copy{pin->data(), back.data(), bytes};
      REQUIRE(store.backend().copy_to_host(std::span<const BlockCopy>(&copy, 1)).ok());
      wrong += !block_matches(back.data(), bytes, b);
    }
  }
  CHECK(wrong == 0);
  return errors;
}

// Reads the nvme-homed blocks straight from the file.
void verify_file(TieredStore& store) {
  const uint64_t slot = store.geometry().slot_bytes();
  std::byte* buf = static_cast<std::byte*>(std::aligned_alloc(4096, 256 * slot));
  uint64_t checked = 0, wrong = 0;
  std::vector<BlockIo> io;
  auto flush = [&] {
    const Status st = store.file().read_blocks(io);
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    for (const BlockIo& r : io) wrong += !block_matches(r.buf, store.block_bytes(), static_cast<uint32_t>(r.index));
    checked += io.size();
    io.clear();
  };
  for (uint32_t b = 0; b < store.block_count(); ++b) {
    if (store.home_of(b) != Tier::kNvme) continue;
    io.push_back(BlockIo{b, buf + io.size() * slot});
    if (io.size() == 256) flush();
  }
  if (!io.empty()) flush();
  std::free(buf);
  CHECK(checked > 0);
  CHECK(wrong == 0);
}

void check_all_tiers_used(TieredStore& store) {
  uint64_t host = 0, nvme = 0;
  for (uint32_t b = 0; b < store.block_count(); ++b) ++(store.home_of(b) == Tier::kHost ? host : nvme);
  CHECK(host > 0);
  CHECK(nvme > 0);
  const StoreStats s = store.stats();
  CHECK(s.gpu_evictions > 0);  // the gpu tier is far smaller than the context
  CHECK(s.host_cache_evictions > 0);
  MESSAGE("homes: " << host << " host, " << nvme << " nvme; " << store.describe());
}

std::string make_temp_dir() {
  char tmpl[] = "/tmp/kvtier_tiered_XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  return tmpl;
}

}  // namespace

TEST_CASE("budgets that cannot hold sinks and window are refused with the numbers") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 16, 1 * kMiB, 16 * kMiB);
  auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), file_geometry(c));
  REQUIRE(file.ok());
  const auto store = TieredStore::create(*backend, c, std::move(file).value());
  REQUIRE_FALSE(store.ok());
  const std::string m = store.status().message();
  CHECK(m.find("gpu_bytes=1 MiB") != std::string::npos);
  CHECK(m.find("268 blocks") != std::string::npos);  // 2 x 2 x (2 sink + 64 window + 1)
}

TEST_CASE("a write batch outside 1 to the file's batch is refused, naming the field") {
  auto backend = cpu::make_cpu_backend();
  for (uint32_t blocks : {0u, static_cast<uint32_t>(kFileBatchBlocks) + 1}) {
    CAPTURE(blocks);
    StoreConfig c = small_config(1 << 16, 16 * kMiB, 2 * kMiB);
    c.write_batch_blocks = blocks;
    auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), file_geometry(c));
    REQUIRE(file.ok());
    const auto store = TieredStore::create(*backend, c, std::move(file).value());
    REQUIRE_FALSE(store.ok());
    CHECK(store.status().code() == StatusCode::kInvalidArgument);
    CHECK(store.status().message().find("write_batch_blocks=" + std::to_string(blocks)) != std::string::npos);
  }
}

TEST_CASE("an invalid shape or empty context is an error, not an abort") {
  auto backend = cpu::make_cpu_backend();
  StoreConfig c = small_config(1 << 16, 16 * kMiB, 16 * kMiB);
  auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), file_geometry(c));
  REQUIRE(file.ok());
  c.shape.head_dim = 96;
  const auto bad_shape = TieredStore::create(*backend, c, std::move(file).value());
  REQUIRE_FALSE(bad_shape.ok());
  CHECK(bad_shape.status().message().find("head_dim=96") != std::string::npos);
  c = small_config(0, 16 * kMiB, 16 * kMiB);
  auto file2 = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}),
                                    file_geometry(small_config(1 << 16, 0, 0)));
  const auto empty = TieredStore::create(*backend, c, std::move(file2).value());
  REQUIRE_FALSE(empty.ok());
  CHECK(empty.status().message().find("max_tokens=0") != std::string::npos);
}

TEST_CASE("a file of another shape is refused") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 16, 16 * kMiB, 16 * kMiB);
  FileGeometry other = file_geometry(c);
  other.chunks_per_head /= 2;
  auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), other);
  REQUIRE(file.ok());
  const auto store = TieredStore::create(*backend, c, std::move(file).value());
  REQUIRE_FALSE(store.ok());
  CHECK(store.status().message().find("another shape or length") != std::string::npos);
}

TEST_CASE("usage errors name the block") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 16, 16 * kMiB, 16 * kMiB);
  auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), file_geometry(c));
  auto store = TieredStore::create(*backend, c, std::move(file).value());
  REQUIRE(store.ok());
  TieredStore& s = **store;
  const Status unwritten = s.wait(s.prefetch(std::vector<uint32_t>{5}, Tier::kGpu));
  CHECK(unwritten.message().find("block 5 (block(layer=0, kv_head=0, chunk=5)) has not been written home") !=
        std::string::npos);
  std::vector<std::byte> data(s.block_bytes());
  fill_block(data.data(), data.size(), 5, 0);
  CHECK(s.write_home(5, data.data()).ok());
  CHECK(s.pin(5, Tier::kGpu).status().message().find("not resident in the gpu tier") != std::string::npos);
  CHECK(s.write_home(99999, data.data()).message().find("outside the context") != std::string::npos);
  REQUIRE(s.wait(s.prefetch(std::vector<uint32_t>{5}, Tier::kGpu)).ok());
  {
    Result<BlockPin> pin = s.pin(5, Tier::kGpu);
    REQUIRE(pin.ok());
    CHECK(s.write_home(5, data.data()).message().find("is pinned") != std::string::npos);
  }
  fill_block(data.data(), data.size(), 5, 1);  // a new version replaces the cached copies
  REQUIRE(s.write_home(5, data.data()).ok());
  CHECK_FALSE(s.resident(5, Tier::kGpu));
  REQUIRE(s.wait(s.prefetch(std::vector<uint32_t>{5}, Tier::kHost)).ok());
  Result<BlockPin> pin = s.pin(5, Tier::kHost);
  REQUIRE(pin.ok());
  CHECK(block_matches(pin->data(), s.block_bytes(), 5, 1));
  CHECK(s.wait(Ticket{12345}).message().find("never issued") != std::string::npos);
}

namespace {

// Row 0's chunks [first, last] as block indices (row 0 = layer 0, kv head 0).
std::vector<uint32_t> chunk_range(uint32_t first, uint32_t last) {
  std::vector<uint32_t> out;
  for (uint32_t ch = first; ch <= last; ++ch) out.push_back(ch);
  return out;
}

// A store over an in-memory fault device (no faults) with every block written home.
std::unique_ptr<TieredStore> written_store(ComputeBackend& backend, const StoreConfig& c) {
  auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), file_geometry(c));
  REQUIRE(file.ok());
  auto store = TieredStore::create(backend, c, std::move(file).value());
  REQUIRE(store.ok());
  write_all(**store);
  return std::move(store).value();
}

// Streams row 0's far chunks [2, 800) through the gpu in requests of 256.
void churn(TieredStore& s) {
  for (uint32_t first = 2; first + 256 <= 800; first += 256)
    REQUIRE(s.wait(s.prefetch(chunk_range(first, first + 255), Tier::kGpu)).ok());
}

// Makes every read request of a store over a fault device take latency_us.
FaultDevice& slow_reads(TieredStore& s, uint32_t latency_us) {
  auto* device = dynamic_cast<FaultDevice*>(&s.file().device());
  REQUIRE(device != nullptr);
  FaultConfig slow;
  slow.latency_us = latency_us;
  device->set_faults(slow);
  return *device;
}

// A written store of 64K tokens whose chunks 10-19 are on the gpu.
struct GpuFetched {
  std::unique_ptr<ComputeBackend> backend = cpu::make_cpu_backend();
  StoreConfig config = small_config(1 << 16, 512 * 16 * 1024, 32 * kMiB);
  std::unique_ptr<TieredStore> store = written_store(*backend, config);
  GpuFetched() { REQUIRE(store->wait(store->prefetch(chunk_range(10, 19), Tier::kGpu)).ok()); }
};

}  // namespace

TEST_CASE("an upload of host-resident blocks does not wait behind NVMe reads; one that needs a read does") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 16, 512 * 16 * 1024, 32 * kMiB);
  const std::unique_ptr<TieredStore> store = written_store(*backend, c);
  TieredStore& s = *store;
  std::vector<uint32_t> host, nvme;
  for (uint32_t b = 0; b < s.block_count(); ++b) {
    std::vector<uint32_t>& to = s.home_of(b) == Tier::kHost ? host : nvme;
    if (to.size() < 8) to.push_back(b);
  }
  REQUIRE(host.size() == 8);
  REQUIRE(nvme.size() == 8);
  FaultDevice& device = slow_reads(s, 300'000);  // each read request takes 0.3 s
  const Ticket read = s.prefetch(nvme, Tier::kHost);
  const Ticket up = s.prefetch(host, Tier::kGpu);
  REQUIRE(s.wait(up).ok());
  // The upload ran beside the read, not after it.
  const std::optional<Status> read_done = s.try_wait(read);
  CHECK_FALSE(read_done.has_value());
  CHECK(s.stats().uploads_via_mover == 0);
  // An upload of a block that read brings in runs after it, on the mover.
  const Ticket behind = s.prefetch(std::vector<uint32_t>{nvme[0]}, Tier::kGpu);
  REQUIRE(s.wait(behind).ok());
  CHECK(s.stats().uploads_via_mover == 1);
  if (!read_done) REQUIRE(s.wait(read).ok());
  device.set_faults(FaultConfig{});
  std::vector<std::byte> back(s.block_bytes());
  std::vector<uint32_t> check = host;
  check.push_back(nvme[0]);
  for (uint32_t b : check) {
    Result<BlockPin> pin = s.pin(b, Tier::kGpu);
    REQUIRE_MESSAGE(pin.ok(), pin.status().to_string());
    const BlockCopy copy{pin->data(), back.data(), back.size()};
    REQUIRE(backend->copy_to_host(std::span<const BlockCopy>(&copy, 1)).ok());
    CHECK(block_matches(back.data(), back.size(), b));
  }
  for (uint32_t b : nvme) CHECK(s.resident(b, Tier::kHost));
}

TEST_CASE("a census marks the copies it finds as used, so that reads issued next evict other staging copies") {
  auto backend = cpu::make_cpu_backend();
  StoreConfig c = small_config(1 << 16, 512 * 16 * 1024, 32 * kMiB);
  c.budgets.host_cache_bytes = 64 * 16 * 1024;  // a staging cache of 64 blocks
  const std::unique_ptr<TieredStore> store = written_store(*backend, c);
  TieredStore& s = *store;
  std::vector<uint32_t> nvme;
  for (uint32_t b = 0; b < s.block_count() && nvme.size() < 96; ++b)
    if (s.home_of(b) == Tier::kNvme) nvme.push_back(b);
  REQUIRE(nvme.size() == 96);
  const std::vector<uint32_t> older(nvme.begin(), nvme.begin() + 8), newer(nvme.begin() + 8, nvme.begin() + 64),
      next(nvme.begin() + 64, nvme.end());
  // The cache fills: `older` first, so they are the least recently used.
  REQUIRE(s.wait(s.prefetch(older, Tier::kHost)).ok());
  REQUIRE(s.wait(s.prefetch(newer, Tier::kHost)).ok());
  std::vector<Tier> where(older.size());
  s.census(older, where);
  for (Tier t : where) CHECK(t == Tier::kHost);
  // 32 more reads evict 32 copies: the census made `older` the most recent.
  const uint64_t evicted_before = s.stats().host_cache_evictions;
  REQUIRE(s.wait(s.prefetch(next, Tier::kHost)).ok());
  CHECK(s.stats().host_cache_evictions - evicted_before == 32);
  for (uint32_t b : older) CHECK_MESSAGE(s.resident(b, Tier::kHost), "block " << b);
  uint32_t newer_left = 0;
  for (uint32_t b : newer) newer_left += s.resident(b, Tier::kHost);
  CHECK(newer_left == 56 - 32);
  // residency() answers the same without marking anything.
  std::vector<Tier> again(older.size());
  s.residency(older, again);
  CHECK(again == where);
}

TEST_CASE("try_prefetch queues nothing behind a queue as deep as asked, and queues like prefetch otherwise") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 16, 512 * 16 * 1024, 32 * kMiB);
  const std::unique_ptr<TieredStore> store = written_store(*backend, c);
  TieredStore& s = *store;
  std::vector<uint32_t> nvme;
  for (uint32_t b = 0; b < s.block_count() && nvme.size() < 5; ++b)
    if (s.home_of(b) == Tier::kNvme && !s.resident(b, Tier::kHost)) nvme.push_back(b);
  REQUIRE(nvme.size() == 5);
  FaultDevice& device = slow_reads(s, 400'000);  // each read request takes 0.4 s
  // One read runs (or is about to), two wait behind it for 0.4 s at least.
  std::vector<Ticket> reads;
  for (int i = 0; i < 3; ++i) reads.push_back(s.prefetch(std::vector<uint32_t>{nvme[i]}, Tier::kHost));
  const std::optional<Ticket> refused = s.try_prefetch(std::vector<uint32_t>{nvme[3]}, Tier::kHost, 2);
  CHECK_FALSE(refused.has_value());
  CHECK(s.stats().prefetches_refused == 1);
  // The upload lane is empty: a gpu prefetch of a host-homed block is queued.
  uint32_t host_block = 0;
  while (s.home_of(host_block) != Tier::kHost) ++host_block;
  const std::optional<Ticket> up = s.try_prefetch(std::vector<uint32_t>{host_block}, Tier::kGpu, 1);
  REQUIRE(up.has_value());
  const std::optional<Ticket> queued = s.try_prefetch(std::vector<uint32_t>{nvme[4]}, Tier::kHost, 8);
  REQUIRE(queued.has_value());
  device.set_faults(FaultConfig{});
  for (const Ticket& t : reads) REQUIRE(s.wait(t).ok());
  REQUIRE(s.wait(*queued).ok());
  REQUIRE(s.wait(*up).ok());
  CHECK(s.stats().prefetches_refused == 1);
  CHECK(s.stats().prefetch_waits == 0);
  for (int i : {0, 1, 2, 4}) CHECK(s.resident(nvme[i], Tier::kHost));
  CHECK_FALSE(s.resident(nvme[3], Tier::kHost));  // refused: never read
  CHECK(s.resident(host_block, Tier::kGpu));
}

TEST_CASE("pinned, sink and window blocks survive eviction churn; blocks leaving the window do not") {
  auto backend = cpu::make_cpu_backend();
  // 64K tokens: 4 rows x 1024 chunks; the gpu holds 512 of the 4096 blocks.
  const StoreConfig c = small_config(1 << 16, 512 * 16 * 1024, 32 * kMiB);
  const std::unique_ptr<TieredStore> store = written_store(*backend, c);
  TieredStore& s = *store;
  // 60000 tokens: sinks are chunks 0-1, the window chunks 873-937.
  s.set_sequence_tokens(60000);
  REQUIRE(s.wait(s.prefetch(chunk_range(0, 1), Tier::kGpu)).ok());
  REQUIRE(s.wait(s.prefetch(chunk_range(873, 937), Tier::kGpu)).ok());
  REQUIRE(s.wait(s.prefetch(std::vector<uint32_t>{1500}, Tier::kGpu)).ok());
  Result<BlockPin> pinned = s.pin(1500, Tier::kGpu);
  REQUIRE(pinned.ok());
  churn(s);
  CHECK(s.stats().gpu_evictions > 0);
  for (uint32_t b : chunk_range(0, 1)) CHECK(s.resident(b, Tier::kGpu));
  for (uint32_t b : chunk_range(873, 937)) CHECK(s.resident(b, Tier::kGpu));
  CHECK(s.resident(1500, Tier::kGpu));
  std::vector<std::byte> back(s.block_bytes());
  const BlockCopy copy{pinned->data(), back.data(), back.size()};
  REQUIRE(backend->copy_to_host(std::span<const BlockCopy>(&copy, 1)).ok());
  CHECK(block_matches(back.data(), back.size(), 1500));
  // The sequence grows to 64K: the window is now chunks 960-1023, and 873-937 may go.
  s.set_sequence_tokens(1 << 16);
  REQUIRE(s.wait(s.prefetch(chunk_range(960, 1023), Tier::kGpu)).ok());
  churn(s);
  uint32_t old_window_left = 0;
  for (uint32_t b : chunk_range(873, 937)) old_window_left += s.resident(b, Tier::kGpu);
  CHECK(old_window_left == 0);  // least recent: gone first
  for (uint32_t b : chunk_range(960, 1023)) CHECK(s.resident(b, Tier::kGpu));
  for (uint32_t b : chunk_range(0, 1)) CHECK(s.resident(b, Tier::kGpu));
  // The batched query agrees with resident() on every block, whatever the churn left where.
  std::vector<uint32_t> all(s.block_count());
  std::iota(all.begin(), all.end(), 0u);
  std::vector<Tier> where(all.size());
  s.residency(all, where);
  size_t per_tier[3] = {0, 0, 0};
  for (uint32_t b : all) {
    const Tier want = s.resident(b, Tier::kGpu) ? Tier::kGpu : s.resident(b, Tier::kHost) ? Tier::kHost : Tier::kNvme;
    CHECK_MESSAGE(where[b] == want, "block " << b);
    ++per_tier[where[b] == Tier::kGpu ? 0 : where[b] == Tier::kHost ? 1 : 2];
  }
  CHECK(per_tier[0] > 0);  // the churn leaves blocks in more than one tier
  CHECK(per_tier[0] + per_tier[1] + per_tier[2] == all.size());
  CHECK((per_tier[1] > 0 || per_tier[2] > 0));
}

TEST_CASE("the gpu tier keeps NVMe-homed copies while host-homed ones can make room (home-aware), not under lru") {
  auto backend = cpu::make_cpu_backend();
  for (const GpuEviction eviction : {GpuEviction::kHomeAware, GpuEviction::kLru}) {
    CAPTURE(gpu_eviction_name(eviction));
    // 4096 blocks of 16 KiB, 512 gpu slots; 24 MiB of host homes hold blocks
    // 0-1535 (written in order), so rows 2 and 3 are homed on NVMe.
    StoreConfig c = small_config(1 << 16, 512 * 16 * 1024, 32 * kMiB);
    c.gpu_eviction = eviction;
    const std::unique_ptr<TieredStore> store = written_store(*backend, c);
    TieredStore& s = *store;
    std::vector<uint32_t> nvme_homed;
    for (uint32_t b = 3072 + 100; b < 3072 + 300; ++b) nvme_homed.push_back(b);
    REQUIRE(s.home_of(nvme_homed.front()) == Tier::kNvme);
    REQUIRE(s.home_of(2) == Tier::kHost);
    REQUIRE(s.wait(s.prefetch(nvme_homed, Tier::kGpu)).ok());
    const uint64_t reads = s.stats().nvme_reads;
    CHECK(reads >= nvme_homed.size());
    churn(s);  // 768 host-homed blocks through the 512 slots
    CHECK(s.stats().gpu_evictions > 0);
    uint32_t kept = 0;
    for (uint32_t b : nvme_homed) kept += s.resident(b, Tier::kGpu);
    const uint64_t uploads = s.stats().h2d_blocks;
    REQUIRE(s.wait(s.prefetch(nvme_homed, Tier::kGpu)).ok());
    for (uint32_t b : nvme_homed) CHECK(s.resident(b, Tier::kGpu));
    if (eviction == GpuEviction::kHomeAware) {
      CHECK(kept == nvme_homed.size());
      CHECK(s.stats().h2d_blocks == uploads);  // asking again moved nothing
    } else {
      CHECK(kept == 0);  // least recent: gone first
      CHECK(s.stats().h2d_blocks >= uploads + nvme_homed.size());
    }
  }
}

TEST_CASE("pin_resident pins what is there under one lock, leaves the rest empty, and refuses a bad block") {
  GpuFetched f;
  TieredStore& s = *f.store;
  const std::vector<uint32_t> asked = {10, 3000, 15, 19, 2};  // 3000 is NVMe-homed, 2 never fetched
  std::vector<BlockPin> pins(asked.size());
  REQUIRE(s.pin_resident(asked, Tier::kGpu, pins).ok());
  for (size_t i = 0; i < asked.size(); ++i) {
    CAPTURE(asked[i]);
    CHECK(static_cast<bool>(pins[i]) == s.resident(asked[i], Tier::kGpu));
    if (pins[i]) CHECK(pins[i].block() == asked[i]);
  }
  CHECK(pins[0]);
  CHECK(!pins[1]);
  // Pinned copies survive churn through every other gpu slot.
  churn(s);
  for (uint32_t b : {10u, 15u, 19u}) CHECK(s.resident(b, Tier::kGpu));
  // Host: host homes are resident there, an unfetched NVMe home is not.
  std::vector<BlockPin> host(2);
  REQUIRE(s.pin_resident(std::vector<uint32_t>{5, 3500}, Tier::kHost, host).ok());
  CHECK(host[0]);
  CHECK(!host[1]);
  std::vector<BlockPin> bad(2);
  const Status st = s.pin_resident(std::vector<uint32_t>{10, s.block_count()}, Tier::kGpu, bad);
  CHECK(!st.ok());
  CHECK(bad[0]);  // made before the bad block; released with the vector
}

TEST_CASE("release drops a batch of pins under one lock: the pins are empty and their copies evictable again") {
  GpuFetched f;
  TieredStore& s = *f.store;
  const std::vector<uint32_t> asked = {10, 3000, 15};  // 3000 is not on the gpu: its pin stays empty
  std::vector<BlockPin> pins(asked.size());
  REQUIRE(s.pin_resident(asked, Tier::kGpu, pins).ok());
  std::vector<BlockPin> host(1);
  REQUIRE(s.pin_resident(std::vector<uint32_t>{5}, Tier::kHost, host).ok());
  pins.push_back(std::move(host[0]));
  REQUIRE(pins[0]);
  REQUIRE(pins[3]);
  s.release(pins);
  for (const BlockPin& p : pins) CHECK(!p);
  // Unpinned, the gpu copies go in the churn like any other.
  churn(s);
  CHECK(!s.resident(10, Tier::kGpu));
  CHECK(!s.resident(15, Tier::kGpu));
  // A pin of another store is not this store's to release.
  const std::unique_ptr<TieredStore> other = written_store(*f.backend, f.config);
  std::vector<BlockPin> theirs(1);
  REQUIRE(other->pin_resident(std::vector<uint32_t>{5}, Tier::kHost, theirs).ok());
  s.release(theirs);
  CHECK(theirs[0]);
}

TEST_CASE("many threads prefetching, pinning and reading at once see only right bytes") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 16, 512 * 16 * 1024, 16 * kMiB);
  const std::unique_ptr<TieredStore> store = written_store(*backend, c);
  TieredStore& s = *store;
  std::atomic<uint64_t> checked{0}, wrong{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      auto gen = test::rng(100 + t);
      std::vector<std::byte> back(s.block_bytes());
      for (int iter = 0; iter < 60; ++iter) {
        std::vector<uint32_t> blocks;
        for (int k = 0; k < 32; ++k) blocks.push_back(static_cast<uint32_t>(gen() % s.block_count()));
        const Tier tier = iter % 3 == 0 ? Tier::kHost : Tier::kGpu;
        if (!s.wait(s.prefetch(blocks, tier)).ok()) {
          ++failed;
          continue;
        }
        for (uint32_t b : blocks) {
          Result<BlockPin> pin = s.pin(b, tier);
          if (!pin.ok()) continue;  // another thread's request evicted it meanwhile: allowed
          const BlockCopy copy{pin->data(), back.data(), back.size()};
          if (!backend->copy_to_host(std::span<const BlockCopy>(&copy, 1)).ok()) ++failed;
          wrong += !block_matches(back.data(), back.size(), b);
          ++checked;
        }
      }
    });
  for (auto& th : threads) th.join();
  CHECK(wrong == 0);
  CHECK(failed == 0);
  CHECK(checked > 1000);
  CHECK(s.stats().gpu_evictions > 0);
}

TEST_CASE("1M tokens through all three tiers on the fault-injecting device, faults on") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 20, 64 * kMiB, 256 * kMiB);
  auto medium = make_fault_medium();
  FaultConfig faults;
  faults.seed = test::seed();
  faults.short_read = 0.02;
  faults.eagain = 0.02;
  faults.eio = 0.0005;
  faults.flip_on_read = 0.005;
  auto device = make_fault_device(medium, "fault:ctx", faults);
  FaultDevice* dev = device.get();
  auto file = BlockFile::create_on(std::move(device), file_geometry(c));
  REQUIRE_MESSAGE(file.ok(), file.status().to_string());
  auto store = TieredStore::create(*backend, c, std::move(file).value());
  REQUIRE_MESSAGE(store.ok(), store.status().to_string());
  uint64_t surfaced = write_all(**store, 50);
  surfaced += verify_through(**store, Tier::kHost, 50);
  surfaced += verify_through(**store, Tier::kGpu, 50);
  check_all_tiers_used(**store);
  REQUIRE((*store)->save().ok());
  store = Result<std::unique_ptr<TieredStore>>(internal_error("closed"));
  // Reopen over the same medium, faults still on.
  auto reopened_file = BlockFile::open_on(make_fault_device(medium, "fault:ctx", faults));
  REQUIRE_MESSAGE(reopened_file.ok(), reopened_file.status().to_string());
  auto reopened = TieredStore::reopen(*backend, c, std::move(reopened_file).value());
  REQUIRE(reopened.ok());
  surfaced += verify_through(**reopened, Tier::kHost, 50);
  const FaultDevice::Counters k = dev->counters();
  MESSAGE("faults injected: " << k.short_reads << " short reads, " << k.eagains << " EAGAIN, " << k.eios
                              << " EIO, " << k.read_flips << " flipped reads; errors surfaced: " << surfaced);
  CHECK(k.short_reads > 0);
  CHECK(k.read_flips > 0);
  CHECK(k.eios > 0);
  CHECK(surfaced > 0);  // EIO is not retried below the store: it reaches the caller
}

TEST_CASE("persistent corruption is reported naming the block, never returned") {
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 16, 16 * kMiB, 2 * kMiB);  // small host: most homes on nvme
  auto medium = make_fault_medium();
  auto device = make_fault_device(medium, "fault:corrupt", FaultConfig{});
  FaultDevice* dev = device.get();
  auto file = BlockFile::create_on(std::move(device), file_geometry(c));
  auto store = TieredStore::create(*backend, c, std::move(file).value());
  REQUIRE(store.ok());
  TieredStore& s = **store;
  write_all(s);
  REQUIRE(s.home_of(3000) == Tier::kNvme);
  FaultConfig flip;
  flip.flip_stored = 1.0;
  dev->set_faults(flip);
  std::vector<std::byte> data(s.block_bytes());
  fill_block(data.data(), data.size(), 3000, 0);
  REQUIRE(s.write_home(3000, data.data()).ok());  // the medium flips a stored bit
  dev->set_faults(FaultConfig{});
  const Status st = s.wait(s.prefetch(std::vector<uint32_t>{3000}, Tier::kHost));
  REQUIRE_FALSE(st.ok());
  CHECK(st.code() == StatusCode::kCorrupt);
  CHECK(st.message().find("block 3000") != std::string::npos);
  CHECK_FALSE(s.resident(3000, Tier::kHost));
}

namespace {

// A store over the fault-injecting device whose small host budget puts most
// homes on nvme (64 host homes, then nvme).
struct FaultStore {
  std::unique_ptr<ComputeBackend> backend = cpu::make_cpu_backend();
  FaultDevice* device = nullptr;
  std::unique_ptr<TieredStore> store;
  explicit FaultStore(uint64_t gpu_bytes = 16 * kMiB, uint32_t write_batch_blocks = kFileBatchBlocks) {
    StoreConfig c = small_config(1 << 16, gpu_bytes, 2 * kMiB);
    c.write_batch_blocks = write_batch_blocks;
    auto dev = make_fault_device(make_fault_medium(), "fault:behind", FaultConfig{});
    device = dev.get();
    auto file = BlockFile::create_on(std::move(dev), file_geometry(c));
    REQUIRE(file.ok());
    auto s = TieredStore::create(*backend, c, std::move(file).value());
    REQUIRE_MESSAGE(s.ok(), s.status().to_string());
    store = std::move(s).value();
  }
};

// Version `v` of blocks [first, first + n), filled, and the writes over them.
struct Versions {
  std::vector<std::byte> data;
  std::vector<BlockWrite> writes;
  Versions(const TieredStore& s, uint32_t first, uint32_t n, uint32_t v) : data(size_t{n} * s.block_bytes()) {
    for (uint32_t k = 0; k < n; ++k) {
      fill_block(data.data() + size_t{k} * s.block_bytes(), s.block_bytes(), first + k, v);
      writes.push_back({first + k, data.data() + size_t{k} * s.block_bytes()});
    }
  }
};

// Blocks [first, first + n) read back through `tier` (32 at a time: the
// staging cache holds 64) and compared with version v.
void check_version(TieredStore& s, uint32_t first, uint32_t n, Tier tier, uint32_t v) {
  std::vector<std::byte> back(s.block_bytes());
  uint64_t wrong = 0;
  for (uint32_t at = first; at < first + n; at += 32) {
    const std::vector<uint32_t> blocks = chunk_range(at, std::min(first + n, at + 32) - 1);
    const Status st = s.wait(s.prefetch(blocks, tier));
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    for (uint32_t b : blocks) {
      Result<BlockPin> pin = s.pin(b, tier);
      REQUIRE_MESSAGE(pin.ok(), pin.status().to_string());
      const BlockCopy copy{pin->data(), back.data(), back.size()};
      REQUIRE(s.backend().copy_to_host(std::span<const BlockCopy>(&copy, 1)).ok());
      wrong += !block_matches(back.data(), back.size(), b, v);
    }
  }
  CHECK(wrong == 0);
}

// A ParallelFor over plain threads, counting the ranges it ran.
ParallelFor thread_pool(std::atomic<uint64_t>& ranges) {
  return [&ranges](size_t n, size_t grain, const std::function<void(size_t, size_t)>& body) {
    std::vector<std::thread> threads;
    for (size_t begin = 0; begin < n; begin += std::max<size_t>(grain, n / 4 + 1)) {
      const size_t end = std::min(n, begin + std::max<size_t>(grain, n / 4 + 1));
      ++ranges;
      threads.emplace_back([&body, begin, end] { body(begin, end); });
    }
    for (auto& t : threads) t.join();
  };
}

}  // namespace

TEST_CASE("a write in flight is never read from home; its gpu copies serve it, and it reads right once finished") {
  FaultStore f;
  TieredStore& s = *f.store;
  // Blocks 0-63 get the host homes, 64-199 nvme homes; version 0 everywhere.
  REQUIRE(s.write_home(Versions(s, 0, 200, 0).writes).ok());
  REQUIRE(s.home_of(10) == Tier::kHost);
  REQUIRE(s.home_of(150) == Tier::kNvme);
  const Versions v1(s, 0, 200, 1);
  Result<HomeWrite> w = s.begin_write(std::span(v1.writes).first(100), /*cache_on_gpu=*/false);
  REQUIRE_MESSAGE(w.ok(), w.status().to_string());
  CHECK(w->holds(10));
  CHECK(w->holds(90));
  CHECK_FALSE(w->holds(150));
  // Neither home (host 10, nvme 90) is readable while the write is open; the
  // blocks outside it are.
  for (uint32_t b : {10u, 90u}) {
    for (Tier tier : {Tier::kHost, Tier::kGpu}) {
      const Status st = s.wait(s.prefetch(std::vector<uint32_t>{b}, tier));
      CHECK(st.message().find("a write is in progress") != std::string::npos);
    }
    CHECK_FALSE(s.pin(b, Tier::kHost).ok());
    CHECK_FALSE(s.resident(b, Tier::kHost));
  }
  check_version(s, 150, 50, Tier::kHost, 0);
  // A second write of a block in flight, and a save, are refused.
  CHECK(s.write_home(v1.writes[10].block, v1.writes[10].data).message().find("already being written") !=
        std::string::npos);
  CHECK(s.save().message().find("unfinished") != std::string::npos);
  std::atomic<uint64_t> ranges{0};
  Status landed;
  std::thread lander([&] { landed = w->land(thread_pool(ranges)); });
  lander.join();
  REQUIRE_MESSAGE(landed.ok(), landed.to_string());
  CHECK(w->holds(90));  // landed, not finished: still busy
  CHECK(s.wait(s.prefetch(std::vector<uint32_t>{90}, Tier::kHost)).message().find("in progress") != std::string::npos);
  REQUIRE(w->finish().ok());
  CHECK_FALSE(w->holds(90));
  CHECK(ranges > 1);  // the copies went through the lent pool
  // 64 host homes and 36 NVMe homes: both phases took time.
  CHECK(w->copy_us() > 0);
  CHECK(w->file_write_us() > 0);
  check_version(s, 0, 100, Tier::kHost, 1);
  check_version(s, 0, 100, Tier::kGpu, 1);
  check_version(s, 100, 100, Tier::kGpu, 0);
  CHECK(s.save().ok());

  SUBCASE("with cache_on_gpu, the gpu copies are there before the write lands") {
    Result<HomeWrite> g = s.begin_write(std::span(v1.writes).subspan(100, 50), /*cache_on_gpu=*/true);
    REQUIRE(g.ok());
    // A gpu hit serves a busy block; its home is still refused.
    check_version(s, 100, 50, Tier::kGpu, 1);
    CHECK_FALSE(s.wait(s.prefetch(std::vector<uint32_t>{120}, Tier::kHost)).ok());
    REQUIRE(g->land().ok());
    REQUIRE(g->finish().ok());
    check_version(s, 100, 50, Tier::kHost, 1);
  }
  SUBCASE("a write dropped before it landed leaves its blocks unwritten") {
    { Result<HomeWrite> g = s.begin_write(std::span(v1.writes).subspan(150, 10)); REQUIRE(g.ok()); }
    CHECK(s.wait(s.prefetch(std::vector<uint32_t>{155}, Tier::kHost)).message().find("has not been written home") !=
          std::string::npos);
    check_version(s, 160, 40, Tier::kHost, 0);
  }
}

TEST_CASE("a failed nvme write leaves its blocks unwritten in every tier and names the block") {
  FaultStore f;
  TieredStore& s = *f.store;
  REQUIRE(s.write_home(Versions(s, 0, 200, 0).writes).ok());
  const Versions v1(s, 0, 200, 1);
  StatusCode code = StatusCode::kOk;
  std::string named;
  SUBCASE("EIO") {
    FaultConfig broken;
    broken.eio = 1.0;  // transient, but every try fails
    f.device->set_faults(broken);
    code = StatusCode::kIoError;
    named = "fault:behind, block 64 ";
  }
  SUBCASE("a full disk") {
    FaultConfig full;
    full.capacity_bytes = s.file().block_offset(100);
    f.device->set_faults(full);
    code = StatusCode::kNoSpace;
    named = "fault:behind, block 100 ";
  }
  // Host homes 40-63 and nvme homes 64-119 in one write, cached on the gpu as it begins.
  Result<HomeWrite> w = s.begin_write(std::span(v1.writes).subspan(40, 80), /*cache_on_gpu=*/true);
  REQUIRE(w.ok());
  CHECK(s.resident(100, Tier::kGpu));
  const Status landed = w->land();
  CHECK(landed.code() == code);
  CHECK_MESSAGE(landed.message().find(named) != std::string::npos, landed.message());
  CHECK(w->finish().message() == landed.message());
  f.device->set_faults(FaultConfig{});
  for (uint32_t b : {64u, 100u, 119u}) {
    CAPTURE(b);
    CHECK_FALSE(s.resident(b, Tier::kGpu));  // the copy that was made from it is gone too
    CHECK_FALSE(s.resident(b, Tier::kHost));
    CHECK(s.wait(s.prefetch(std::vector<uint32_t>{b}, Tier::kGpu)).message().find("has not been written home") !=
          std::string::npos);
  }
  check_version(s, 40, 24, Tier::kHost, 1);   // the host homes of the call landed
  check_version(s, 120, 80, Tier::kHost, 0);  // blocks outside it are untouched
  // Written again, the blocks read right.
  REQUIRE(s.write_home(std::span(v1.writes).subspan(64, 56)).ok());
  check_version(s, 64, 56, Tier::kGpu, 1);
}

TEST_CASE("a refused write touches no block of the call") {
  FaultStore f;
  TieredStore& s = *f.store;
  REQUIRE(s.write_home(Versions(s, 0, 100, 0).writes).ok());
  REQUIRE(s.wait(s.prefetch(std::vector<uint32_t>{80}, Tier::kGpu)).ok());
  const Versions v1(s, 0, 100, 1);
  {
    Result<BlockPin> pin = s.pin(80, Tier::kGpu);
    REQUIRE(pin.ok());
    CHECK(s.write_home(v1.writes).message().find("block 80 ") != std::string::npos);
  }
  std::vector<BlockWrite> twice = {v1.writes[5], v1.writes[70], v1.writes[5]};
  CHECK(s.write_home(twice).message().find("listed twice") != std::string::npos);
  check_version(s, 0, 100, Tier::kHost, 0);  // the blocks before the pinned one kept version 0
}

TEST_CASE("home writes go to the file in batches of write_batch_blocks, and land the same") {
  // Blocks 0-63 get the host homes, 64-199 NVMe homes: 136 adjacent blocks
  // of 16 KiB are 3 joined requests of at most 1 MiB in one file write, and
  // at least 46 when the file gets them 3 at a time.
  uint64_t requests[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    CAPTURE(i);
    FaultStore f(16 * kMiB, i == 0 ? static_cast<uint32_t>(kFileBatchBlocks) : 3u);
    TieredStore& s = *f.store;
    const uint64_t before = f.device->counters().requests;
    REQUIRE(s.write_home(Versions(s, 0, 200, 0).writes).ok());
    requests[i] = f.device->counters().requests - before;
    REQUIRE(s.home_of(150) == Tier::kNvme);
    CHECK(s.stats().nvme_writes == 136);
    check_version(s, 0, 200, Tier::kHost, 0);
  }
  CHECK(requests[0] == 3);
  CHECK(requests[1] >= 46);
}

TEST_CASE("a large write lands through the reused bounce buffer in pieces while other threads read") {
  // 5100 nvme homes in one call are more than one 64 MiB bounce piece (4096
  // blocks of 16 KiB).
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 18, 16 * kMiB, 2 * kMiB);
  auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), file_geometry(c));
  auto store = TieredStore::create(*backend, c, std::move(file).value());
  REQUIRE(store.ok());
  TieredStore& s = **store;
  REQUIRE(s.write_home(Versions(s, 0, 1000, 0).writes).ok());
  const Versions big(s, 1000, 5100, 0);
  Result<HomeWrite> w = s.begin_write(big.writes);
  REQUIRE(w.ok());
  std::atomic<uint64_t> ranges{0}, reads{0}, wrong{0}, failed{0};
  std::atomic<bool> landed{false};
  Status land_status;
  std::thread lander([&] {
    land_status = w->land(thread_pool(ranges));
    landed = true;
  });
  // Reads of other nvme blocks share the file (and its ring) with the write.
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t)
    readers.emplace_back([&, t] {
      auto gen = test::rng(7 + t);
      std::vector<std::byte> back(s.block_bytes());
      for (int iter = 0; iter < 20 || !landed; ++iter) {
        const uint32_t b = 64 + static_cast<uint32_t>(gen() % 936);
        const Tier tier = iter % 2 == 0 ? Tier::kHost : Tier::kGpu;
        if (!s.wait(s.prefetch(std::vector<uint32_t>{b}, tier)).ok()) {
          ++failed;
          continue;
        }
        Result<BlockPin> pin = s.pin(b, tier);
        if (!pin.ok()) continue;  // evicted by the other reader meanwhile: allowed
        const BlockCopy copy{pin->data(), back.data(), back.size()};
        if (!s.backend().copy_to_host(std::span<const BlockCopy>(&copy, 1)).ok()) ++failed;
        wrong += !block_matches(back.data(), back.size(), b, 0);
        ++reads;
      }
    });
  lander.join();
  for (auto& t : readers) t.join();
  REQUIRE_MESSAGE(land_status.ok(), land_status.to_string());
  REQUIRE(w->finish().ok());
  CHECK(wrong == 0);
  CHECK(failed == 0);
  CHECK(reads >= 40);
  CHECK(s.stats().nvme_writes >= 5100);
  check_version(s, 1000, 5100, Tier::kHost, 0);
}

// Needs io_uring: last in the file, since require() ends the process when it is missing.
TEST_CASE("1M tokens through all three tiers on the io_uring store, reopened by a new store") {
  const std::string dir = make_temp_dir();
  const IoProbe probe = probe_io(dir);
  test::require(probe.io_uring && probe.o_direct, "io_uring with O_DIRECT in " + dir + ": " + probe.error.value_or(""));
  auto backend = cpu::make_cpu_backend();
  const StoreConfig c = small_config(1 << 20, 64 * kMiB, 256 * kMiB);
  const std::string path = dir + "/ctx.kvt";
  {
    auto file = BlockFile::create(path, file_geometry(c), UringOptions{});
    REQUIRE_MESSAGE(file.ok(), file.status().to_string());
    auto store = TieredStore::create(*backend, c, std::move(file).value());
    REQUIRE_MESSAGE(store.ok(), store.status().to_string());
    write_all(**store);
    verify_file(**store);
    verify_through(**store, Tier::kHost);
    verify_through(**store, Tier::kGpu);
    check_all_tiers_used(**store);
    REQUIRE((*store)->save().ok());
  }
  auto file = BlockFile::open(path, UringOptions{});
  REQUIRE_MESSAGE(file.ok(), file.status().to_string());
  auto store = TieredStore::reopen(*backend, c, std::move(file).value());
  REQUIRE(store.ok());
  verify_file(**store);  // every block is nvme-homed after reopening
  verify_through(**store, Tier::kGpu);
  store = Result<std::unique_ptr<TieredStore>>(internal_error("closed"));
  std::filesystem::remove_all(dir);
}
