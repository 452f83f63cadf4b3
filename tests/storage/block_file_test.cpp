// BlockFile over the fault-injecting device (every fault, seeded), then over
// a real file through io_uring. The io_uring cases come last: they skip the
// rest of the executable (exit 77) where the kernel refuses io_uring.
#include "kvtier/storage/block_file.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kvtier/storage/block_device.h"
#include "kvtier/storage/crc32c.h"
#include "random.h"
#include "skip.h"

namespace {

namespace fs = std::filesystem;
using kvtier::BlockGeometry;
using kvtier::ModelShape;
using kvtier::Status;
using kvtier::StatusCode;
using namespace kvtier::storage;

// 2 layers x 2 KV heads x 5 chunks = 20 blocks of 6 KiB payload in 8 KiB
// slots, so the padding is covered by the checksum too.
FileGeometry small_geometry() {
  return FileGeometry{ModelShape{2, 4, 2, 64, kvtier::DType::kBf16}, 24, 5};
}

// `count` slots of `slot_bytes`, 4 KiB-aligned as O_DIRECT needs.
class Slots {
 public:
  Slots(size_t count, size_t slot_bytes)
      : count_(count), slot_bytes_(slot_bytes),
        data_(static_cast<std::byte*>(std::aligned_alloc(4096, count * slot_bytes))) {
    REQUIRE(data_ != nullptr);
  }
  std::byte* at(size_t i) const { return data_.get() + i * slot_bytes_; }
  size_t count() const { return count_; }
  size_t slot_bytes() const { return slot_bytes_; }
  void fill_random(std::mt19937_64& gen) {
    for (size_t i = 0; i < count_ * slot_bytes_; ++i) data_.get()[i] = std::byte(gen() & 0xff);
  }
  void poison() { std::memset(data_.get(), 0xa5, count_ * slot_bytes_); }
  bool same_slot(size_t i, const Slots& other, size_t j) const {
    return std::memcmp(at(i), other.at(j), slot_bytes_) == 0;
  }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  size_t count_, slot_bytes_;
  std::unique_ptr<std::byte[], Free> data_;
};

std::vector<BlockIo> ios(const Slots& slots, const std::vector<uint64_t>& indices) {
  std::vector<BlockIo> out;
  for (size_t i = 0; i < indices.size(); ++i) out.push_back(BlockIo{indices[i], slots.at(i)});
  return out;
}

std::vector<uint64_t> all_indices(uint64_t n) {
  std::vector<uint64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string block_name(const FileGeometry& g, uint64_t index) {
  std::ostringstream os;
  os << BlockGeometry(g.shape, g.chunk_tokens).from_flat_index(index, g.chunks_per_head);
  return os.str();
}

std::unique_ptr<BlockFile> create_fault_file(const std::shared_ptr<FaultMedium>& medium, const FaultConfig& faults) {
  auto file = BlockFile::create_on(make_fault_device(medium, "mem:ctx", faults), small_geometry());
  REQUIRE_MESSAGE(file.ok(), file.status().to_string());
  return std::move(file).value();
}

std::unique_ptr<BlockFile> open_fault_file(const std::shared_ptr<FaultMedium>& medium, const FaultConfig& faults) {
  auto file = BlockFile::open_on(make_fault_device(medium, "mem:ctx", faults));
  REQUIRE_MESSAGE(file.ok(), file.status().to_string());
  return std::move(file).value();
}

// Reads every block into fresh poisoned slots and compares with `expected`.
void check_all_blocks(BlockFile& file, const Slots& expected) {
  Slots got(expected.count(), expected.slot_bytes());
  got.poison();
  const Status s = file.read_blocks(ios(got, all_indices(expected.count())));
  REQUIRE_MESSAGE(s.ok(), s.to_string());
  for (size_t i = 0; i < expected.count(); ++i) {
    CAPTURE(i);
    CHECK(got.same_slot(i, expected, i));
  }
}

FaultDevice& fault_device(BlockFile& file) { return static_cast<FaultDevice&>(file.device()); }

}  // namespace

TEST_CASE("fault device without faults: blocks round-trip and survive a reopen") {
  auto gen = kvtier::test::rng(1);
  const FileGeometry g = small_geometry();
  REQUIRE(g.block_count() == 20);
  REQUIRE(g.slot_bytes() == 8192);
  auto medium = make_fault_medium();
  Slots data(g.block_count(), g.slot_bytes());
  data.fill_random(gen);
  {
    auto file = create_fault_file(medium, FaultConfig{});
    CHECK(!file->written(3));
    // Two calls in mixed order: the second one rewrites block 7.
    std::vector<uint64_t> order = all_indices(g.block_count());
    std::shuffle(order.begin(), order.end(), gen);
    std::vector<BlockIo> writes;
    for (uint64_t i : order) writes.push_back(BlockIo{i, data.at(i)});
    REQUIRE(file->write_blocks(std::span(writes).first(10)).ok());
    REQUIRE(file->write_blocks(std::span(writes).subspan(10)).ok());
    REQUIRE(file->write_blocks(std::vector<BlockIo>{{7, data.at(7)}}).ok());
    CHECK(file->written(3));
    CHECK(file->stats().blocks_written == 21);
    check_all_blocks(*file, data);
    CHECK(file->block_offset(0) % 4096 == 0);
    CHECK(file->block_offset(1) - file->block_offset(0) == 8192);
    REQUIRE(file->flush().ok());
  }
  auto reopened = open_fault_file(medium, FaultConfig{});
  CHECK(reopened->geometry() == g);
  CHECK(reopened->written(19));
  check_all_blocks(*reopened, data);
  CHECK(reopened->stats().checksum_failures == 0);
}

TEST_CASE("the destructor flushes: blocks written without flush() are readable after reopening") {
  auto gen = kvtier::test::rng(2);
  auto medium = make_fault_medium();
  Slots data(20, 8192);
  data.fill_random(gen);
  {
    auto file = create_fault_file(medium, FaultConfig{});
    REQUIRE(file->write_blocks(ios(data, all_indices(20))).ok());
  }
  auto reopened = open_fault_file(medium, FaultConfig{});
  check_all_blocks(*reopened, data);
}

TEST_CASE("with transient faults every read returns the exact bytes or an error, never wrong bytes") {
  auto gen = kvtier::test::rng(3);
  auto medium = make_fault_medium();
  Slots data(20, 8192);
  data.fill_random(gen);
  FaultConfig faults;
  faults.seed = gen();
  faults.short_read = 0.3, faults.eagain = 0.1, faults.eio = 0.05, faults.flip_on_read = 0.05;
  // The blocks are written before the faults start: this case is about
  // reads, and an EIO that hits a write's retry too is (rightly) a failed
  // write, which made the case fail on ~5% of seeds.
  auto file = create_fault_file(medium, FaultConfig{});
  const Status written = file->write_blocks(ios(data, all_indices(20)));
  REQUIRE_MESSAGE(written.ok(), written.to_string());
  fault_device(*file).set_faults(faults);
  int ok_reads = 0, failed_reads = 0, corrupt_reads = 0;
  for (int round = 0; round < 300; ++round) {
    std::vector<uint64_t> pick(1 + gen() % 6);
    for (uint64_t& i : pick) i = gen() % 20;
    Slots got(pick.size(), 8192);
    got.poison();
    const Status s = file->read_blocks(ios(got, pick));
    if (!s.ok()) {
      CHECK_MESSAGE((s.code() == StatusCode::kCorrupt || s.code() == StatusCode::kIoError), s.to_string());
      ++failed_reads;
      corrupt_reads += s.code() == StatusCode::kCorrupt;
      continue;
    }
    ++ok_reads;
    for (size_t k = 0; k < pick.size(); ++k) {
      CAPTURE(pick[k]);
      REQUIRE(got.same_slot(k, data, pick[k]));
    }
  }
  const FaultDevice::Counters c = fault_device(*file).counters();
  MESSAGE("ok reads ", ok_reads, ", failed ", failed_reads, " (", corrupt_reads, " flipped twice); injected short ", c.short_reads, " eagain ", c.eagains,
          " eio ", c.eios, " read flips ", c.read_flips);
  CHECK(c.short_reads > 0);
  CHECK(c.eagains > 0);
  CHECK(c.eios > 0);
  CHECK(c.read_flips > 0);
  CHECK(file->stats().retries > 0);
  CHECK(file->stats().checksum_rereads > 0);
  // A read fails only when a flip hits both the read and the re-read of a
  // block (~0.25% a block here), EIO hits a request twice (0.25%), or a
  // request fails 8 times in a row.
  CHECK(ok_reads > 270);
}

TEST_CASE("writes under transient faults land intact") {
  auto gen = kvtier::test::rng(4);
  auto medium = make_fault_medium();
  Slots data(20, 8192);
  data.fill_random(gen);
  FaultConfig faults;
  faults.seed = gen();
  faults.eagain = 0.15;  // EIO is retried only once, so it is tested where it may surface
  auto file = create_fault_file(medium, faults);
  // Five rounds of fresh contents: 100 writes make a run without any
  // injected fault (0.85^100) practically impossible.
  for (int round = 0; round < 5; ++round) {
    data.fill_random(gen);
    for (uint64_t i = 0; i < 20; ++i) {
      const Status s = file->write_blocks(std::vector<BlockIo>{{i, data.at(i)}});
      CHECK_MESSAGE(s.ok(), s.to_string());  // 8 attempts at 15% EAGAIN: ~3e-7 per block
    }
  }
  CHECK(file->stats().retries > 0);
  fault_device(*file).set_faults(FaultConfig{});
  check_all_blocks(*file, data);
  // Joined requests (all 20 blocks adjacent) under EAGAIN and short writes,
  // whose rest is retried. A joined request has 8 attempts in all, so the
  // rates keep a failure of 8 in a row rare (0.12^8 ~ 4e-8 per request)
  // while 100 requests make no short write at all improbable (0.9^100 ~ 3e-5).
  faults.eagain = 0.02;
  faults.short_write = 0.1;
  fault_device(*file).set_faults(faults);
  for (int round = 0; round < 100; ++round) {
    data.fill_random(gen);
    const Status s = file->write_blocks(ios(data, all_indices(20)));
    CHECK_MESSAGE(s.ok(), s.to_string());
  }
  CHECK(fault_device(*file).counters().short_writes > 0);
  fault_device(*file).set_faults(FaultConfig{});
  check_all_blocks(*file, data);
}

TEST_CASE("blocks adjacent in the file and in memory go to the device as one request") {
  auto gen = kvtier::test::rng(41);
  auto medium = make_fault_medium();
  Slots data(20, 8192);
  data.fill_random(gen);
  auto file = create_fault_file(medium, FaultConfig{});
  const uint64_t before = fault_device(*file).counters().requests;
  REQUIRE(file->write_blocks(ios(data, all_indices(20))).ok());
  CHECK(fault_device(*file).counters().requests == before + 1);  // 160 KiB, under the 1 MiB cap
  check_all_blocks(*file, data);
  // Adjacent in the file but not in memory (block 19 - i from slot i): one request each.
  data.fill_random(gen);
  std::vector<uint64_t> reversed = all_indices(20);
  std::reverse(reversed.begin(), reversed.end());
  const uint64_t mid = fault_device(*file).counters().requests;
  REQUIRE(file->write_blocks(ios(data, reversed)).ok());
  CHECK(fault_device(*file).counters().requests == mid + 20);
  Slots got(20, 8192);
  got.poison();
  REQUIRE(file->read_blocks(ios(got, all_indices(20))).ok());
  for (size_t b = 0; b < 20; ++b) CHECK(got.same_slot(b, data, 19 - b));
}

TEST_CASE("a joined write cut short: landed blocks are new, the rest of its request unwritten") {
  auto gen = kvtier::test::rng(42);
  int partial = 0;
  for (int trial = 0; trial < 24; ++trial) {
    CAPTURE(trial);
    auto medium = make_fault_medium();
    Slots old_data(20, 8192), new_data(20, 8192);
    old_data.fill_random(gen);
    new_data.fill_random(gen);
    auto file = create_fault_file(medium, FaultConfig{});
    REQUIRE(file->write_blocks(ios(old_data, all_indices(20))).ok());
    FaultConfig cut;
    cut.seed = gen();
    cut.short_write = 1.0;  // every attempt stores a prefix; 8 attempts may not finish 160 KiB
    fault_device(*file).set_faults(cut);
    const Status s = file->write_blocks(ios(new_data, all_indices(20)));
    fault_device(*file).set_faults(FaultConfig{});
    // Per block: 0 = new contents, 1 = unwritten, 2 = old contents.
    std::vector<int> state(20);
    for (uint64_t b = 0; b < 20; ++b) {
      Slots got(1, 8192);
      got.poison();
      const Status r = file->read_blocks(std::vector<BlockIo>{{b, got.at(0)}});
      if (!r.ok()) {
        CHECK(contains(r.message(), "never written"));
        state[b] = 1;
      } else if (got.same_slot(0, new_data, b)) {
        state[b] = 0;
      } else {
        CHECK(got.same_slot(0, old_data, b));  // never a mix
        state[b] = 2;
      }
    }
    if (s.ok()) {
      for (int v : state) CHECK(v == 0);
      continue;
    }
    ++partial;
    CHECK(s.code() == StatusCode::kIoError);
    // New blocks first, then unwritten ones: the request covered all 20, and
    // a drive may have stored any of its bytes past what it reported. The
    // error names the first block not new.
    const size_t landed = static_cast<size_t>(std::find_if(state.begin(), state.end(), [](int v) { return v != 0; }) - state.begin());
    REQUIRE(landed < 20);
    CHECK(contains(s.message(), "block " + std::to_string(landed) + " "));
    for (size_t b = landed; b < 20; ++b) {
      CHECK(state[b] == 1);
      CHECK(!file->written(b));
    }
  }
  CHECK(partial > 0);
}

TEST_CASE("checksums given with the blocks are the ones recorded: right ones read back, a wrong one reads as corrupt") {
  auto gen = kvtier::test::rng(43);
  auto medium = make_fault_medium();
  Slots data(20, 8192);
  data.fill_random(gen);
  auto file = create_fault_file(medium, FaultConfig{});
  std::vector<uint32_t> crcs;
  for (size_t i = 0; i < 20; ++i) crcs.push_back(crc32c(data.at(i), 8192));
  crcs[6] ^= 1u;  // block 6's bytes land intact; its checksum is off by one bit
  const uint64_t before = fault_device(*file).counters().requests;
  REQUIRE(file->write_blocks(ios(data, all_indices(20)), crcs).ok());
  CHECK(fault_device(*file).counters().requests == before + 1);  // still joined into one request
  CHECK(file->checksum(5) == crcs[5]);
  CHECK(file->checksum(6) == crcs[6]);
  Slots got(1, 8192);
  for (uint64_t b : {0ull, 5ull, 7ull, 19ull}) {
    CAPTURE(b);
    got.poison();
    REQUIRE(file->read_blocks(ios(got, {b})).ok());
    CHECK(got.same_slot(0, data, b));
  }
  const Status bad = file->read_blocks(ios(got, {6}));
  CHECK(bad.code() == StatusCode::kCorrupt);
  CHECK(contains(bad.message(), "block 6 ("));
  // One checksum per block, or nothing is written.
  const Status count = file->write_blocks(ios(data, {3, 4}), std::span(crcs).first(1));
  CHECK(count.code() == StatusCode::kInvalidArgument);
  CHECK(contains(count.message(), "1 checksums for 2 blocks"));
}

TEST_CASE("given checksums across several batches: each block keeps its own") {
  // 2 layers x 2 KV heads x 160 chunks = 640 blocks: three of the file's
  // batches of kFileBatchBlocks, with a wrong checksum in the second.
  auto gen = kvtier::test::rng(44);
  auto medium = make_fault_medium();
  const FileGeometry g{ModelShape{2, 4, 2, 64, kvtier::DType::kBf16}, 24, 160};
  REQUIRE(g.block_count() == 640);
  REQUIRE(g.block_count() > 2 * kFileBatchBlocks);
  auto file = BlockFile::create_on(make_fault_device(medium, "mem:big", FaultConfig{}), g);
  REQUIRE_MESSAGE(file.ok(), file.status().to_string());
  Slots data(640, g.slot_bytes());
  data.fill_random(gen);
  std::vector<uint32_t> crcs;
  for (size_t i = 0; i < 640; ++i) crcs.push_back(crc32c(data.at(i), g.slot_bytes()));
  const uint64_t wrong = kFileBatchBlocks + 17;
  crcs[wrong] ^= 0x80000000u;
  REQUIRE((*file)->write_blocks(ios(data, all_indices(640)), crcs).ok());
  for (uint64_t b : std::vector<uint64_t>{0, 255, 256, wrong - 1, wrong + 1, 511, 512, 639}) {
    CAPTURE(b);
    CHECK((*file)->checksum(b) == crcs[b]);
    Slots got(1, g.slot_bytes());
    got.poison();
    REQUIRE((*file)->read_blocks(ios(got, {b})).ok());
    CHECK(got.same_slot(0, data, b));
  }
  Slots got(1, g.slot_bytes());
  CHECK((*file)->read_blocks(ios(got, {wrong})).code() == StatusCode::kCorrupt);
}

TEST_CASE("a bit flipped at rest is reported as corruption naming the block and offset") {
  auto gen = kvtier::test::rng(5);
  auto medium = make_fault_medium();
  Slots data(20, 8192);
  data.fill_random(gen);
  auto file = create_fault_file(medium, FaultConfig{});
  REQUIRE(file->write_blocks(ios(data, all_indices(20))).ok());
  FaultConfig flip;
  flip.seed = gen();
  flip.flip_stored = 1.0;
  fault_device(*file).set_faults(flip);
  REQUIRE(file->write_blocks(std::vector<BlockIo>{{13, data.at(13)}}).ok());
  CHECK(fault_device(*file).counters().stored_flips == 1);
  fault_device(*file).set_faults(FaultConfig{});

  Slots got(1, 8192);
  const Status s = file->read_blocks(ios(got, {13}));
  REQUIRE(!s.ok());
  CHECK(s.code() == StatusCode::kCorrupt);
  CHECK(contains(s.message(), "mem:ctx"));
  CHECK(contains(s.message(), "block 13 (" + block_name(file->geometry(), 13) + ")"));
  CHECK(contains(s.message(), "offset " + std::to_string(file->block_offset(13))));
  CHECK(contains(s.message(), "crc32c 0x"));
  CHECK(file->stats().checksum_failures == 1);
  // The neighbours are untouched.
  REQUIRE(file->read_blocks(ios(got, {12})).ok());
  CHECK(got.same_slot(0, data, 12));
}

TEST_CASE("persistent EIO is reported as an I/O error naming the block; other blocks still read") {
  auto gen = kvtier::test::rng(6);
  auto medium = make_fault_medium();
  Slots data(20, 8192);
  data.fill_random(gen);
  auto file = create_fault_file(medium, FaultConfig{});
  REQUIRE(file->write_blocks(ios(data, all_indices(20))).ok());
  FaultConfig bad;
  bad.eio = 1.0, bad.persistent_eio = true;
  fault_device(*file).set_faults(bad);
  Slots got(1, 8192);
  Status s = file->read_blocks(ios(got, {4}));
  REQUIRE(!s.ok());
  CHECK(s.code() == StatusCode::kIoError);
  CHECK(contains(s.message(), "block 4 (" + block_name(file->geometry(), 4) + ")"));
  CHECK(contains(s.message(), std::strerror(EIO)));
  // The pages stay bad with the fault switched off; block 5 never touched them.
  fault_device(*file).set_faults(FaultConfig{});
  s = file->read_blocks(ios(got, {4}));
  CHECK(s.code() == StatusCode::kIoError);
  REQUIRE(file->read_blocks(ios(got, {5})).ok());
  CHECK(got.same_slot(0, data, 5));
}

TEST_CASE("a failed write leaves the old contents readable") {
  auto gen = kvtier::test::rng(7);
  auto medium = make_fault_medium();
  Slots old_data(20, 8192), new_data(20, 8192);
  old_data.fill_random(gen);
  new_data.fill_random(gen);
  auto file = create_fault_file(medium, FaultConfig{});
  REQUIRE(file->write_blocks(ios(old_data, all_indices(20))).ok());
  FaultConfig failing;
  failing.eio = 1.0;
  fault_device(*file).set_faults(failing);
  const Status s = file->write_blocks(std::vector<BlockIo>{{9, new_data.at(9)}});
  REQUIRE(!s.ok());
  CHECK(s.code() == StatusCode::kIoError);
  CHECK(contains(s.message(), "write of mem:ctx, block 9"));
  fault_device(*file).set_faults(FaultConfig{});
  CHECK(file->written(9));
  check_all_blocks(*file, old_data);
}

TEST_CASE("create on a medium too small fails with no_space naming the bytes") {
  auto medium = make_fault_medium();
  FaultConfig small;
  small.capacity_bytes = 64 * 1024;
  auto file = BlockFile::create_on(make_fault_device(medium, "mem:small", small), small_geometry());
  REQUIRE(!file.ok());
  CHECK(file.status().code() == StatusCode::kNoSpace);
  // header 4 KiB + table 4 KiB + 20 slots of 8 KiB
  CHECK(contains(file.status().message(), std::to_string(4096 + 4096 + 20 * 8192)));
  CHECK(contains(file.status().message(), "mem:small"));
  CHECK(contains(file.status().message(), std::to_string(64 * 1024) + " bytes are free"));
}

TEST_CASE("bad requests: a never-written block, an index out of range, an unaligned buffer") {
  auto medium = make_fault_medium();
  auto file = create_fault_file(medium, FaultConfig{});
  Slots got(2, 8192);
  Status s = file->read_blocks(ios(got, {2}));
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(contains(s.message(), "never written"));
  CHECK(contains(s.message(), "block 2"));
  s = file->read_blocks(ios(got, {20}));
  CHECK(s.code() == StatusCode::kOutOfRange);
  s = file->write_blocks(std::vector<BlockIo>{{1, got.at(0) + 512}});
  CHECK(s.code() == StatusCode::kInvalidArgument);
  s = file->write_blocks(std::vector<BlockIo>{{1, got.at(0)}, {1, got.at(1)}});
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(!file->written(1));
}

TEST_CASE("open refuses a foreign medium, a corrupt header and a torn checksum table") {
  auto gen = kvtier::test::rng(8);
  Slots junk(16, 4096);
  junk.fill_random(gen);
  auto write_raw = [&](BlockDevice& device, uint64_t offset, std::byte* buf, uint32_t bytes) {
    IoRequest r{IoRequest::Op::kWrite, offset, buf, bytes, 0};
    REQUIRE(device.execute(std::span(&r, 1)).ok());
    REQUIRE(r.result == static_cast<int32_t>(bytes));
  };
  SUBCASE("random bytes") {
    auto medium = make_fault_medium();
    auto device = make_fault_device(medium, "mem:junk", FaultConfig{});
    write_raw(*device, 0, junk.at(0), 16 * 4096);
    auto file = BlockFile::open_on(std::move(device));
    REQUIRE(!file.ok());
    CHECK(contains(file.status().message(), "not a kvtier context file: mem:junk"));
  }
  SUBCASE("an empty medium") {
    auto file = BlockFile::open_on(make_fault_device(make_fault_medium(), "mem:empty", FaultConfig{}));
    REQUIRE(!file.ok());
    CHECK(contains(file.status().message(), "mem:empty is 0 bytes"));
  }
  SUBCASE("header and table damage") {
    for (const bool header : {true, false}) {
      CAPTURE(header);
      auto medium = make_fault_medium();
      create_fault_file(medium, FaultConfig{});
      auto device = make_fault_device(medium, "mem:ctx", FaultConfig{});
      // Byte 64 lies in the header (slot_bytes); byte 4096 + 8 in the table (block 1).
      Slots page(1, 4096);
      IoRequest r{IoRequest::Op::kRead, header ? 0u : 4096u, page.at(0), 4096, 0};
      REQUIRE(device->execute(std::span(&r, 1)).ok());
      page.at(0)[header ? 64 : 8] ^= std::byte{0x10};
      write_raw(*device, r.offset, page.at(0), 4096);
      auto file = BlockFile::open_on(std::move(device));
      REQUIRE(!file.ok());
      CHECK(file.status().code() == StatusCode::kCorrupt);
      CHECK(contains(file.status().message(), header ? "header of mem:ctx is corrupt" : "checksum table of mem:ctx"));
    }
  }
}

// ---- real files: path checks (no io_uring needed) -------------------------

namespace {

// A fresh directory under /tmp, removed with everything in it at the end.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = "/tmp/kvtier-block-file-test-XXXXXX";
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
    REQUIRE(!path_.empty());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace

TEST_CASE("create names the path when it exists or its directory is missing or unusable") {
  const TempDir tmp;
  const UringOptions options;
  SUBCASE("missing directory") {
    const std::string path = tmp.path() + "/no-such-dir/ctx.kv";
    auto file = BlockFile::create(path, small_geometry(), options);
    REQUIRE(!file.ok());
    CHECK(file.status().code() == StatusCode::kNotFound);
    CHECK(contains(file.status().message(), tmp.path() + "/no-such-dir"));
  }
  SUBCASE("existing path") {
    const std::string path = tmp.path() + "/exists.kv";
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT, 0600);
    REQUIRE(fd >= 0);
    ::close(fd);
    auto file = BlockFile::create(path, small_geometry(), options);
    REQUIRE(!file.ok());
    CHECK(contains(file.status().message(), path + " already exists"));
    CHECK(fs::file_size(path) == 0);  // untouched
  }
  SUBCASE("directory not writable") {
    const std::string dir = tmp.path() + "/read-only";
    REQUIRE(::mkdir(dir.c_str(), 0555) == 0);
    const bool bypassed = ::access(dir.c_str(), W_OK) == 0;  // root ignores the mode bits
    // Where permissions are bypassed, a "directory" that is a regular file
    // is the unusable parent that can still be tested.
    std::string parent = dir;
    if (bypassed) {
      parent = tmp.path() + "/regular-file";
      const int fd = ::open(parent.c_str(), O_WRONLY | O_CREAT, 0600);
      REQUIRE(fd >= 0);
      ::close(fd);
    }
    auto file = BlockFile::create(parent + "/ctx.kv", small_geometry(), options);
    REQUIRE(!file.ok());
    CAPTURE(file.status().to_string());
    CHECK(contains(file.status().message(), parent));
  }
  SUBCASE("invalid geometry") {
    FileGeometry g = small_geometry();
    g.chunks_per_head = 0;
    auto file = BlockFile::create(tmp.path() + "/bad.kv", g, options);
    CHECK(file.status().code() == StatusCode::kInvalidArgument);
    CHECK(!fs::exists(tmp.path() + "/bad.kv"));
  }
}

TEST_CASE("open of a missing file names it") {
  auto file = BlockFile::open("/tmp/kvtier-no-such-file-" + std::to_string(getpid()), UringOptions{});
  REQUIRE(!file.ok());
  CHECK(file.status().code() == StatusCode::kNotFound);
  CHECK(contains(file.status().message(), "/tmp/kvtier-no-such-file-"));
}

// ---- real files through io_uring: last, since require() exits -------------

namespace {

// Skips the rest of the executable where the kernel refuses io_uring.
void require_uring(const std::string& dir) {
  const std::string path = dir + "/uring-check";
  auto device = open_uring_device(path, /*create=*/true, UringOptions{});
  ::unlink(path.c_str());
  kvtier::test::require(device.ok() || device.status().code() != StatusCode::kUnavailable,
                        "io_uring unavailable: " + device.status().message());
}

// /tmp may be tmpfs on kernels that refuse O_DIRECT there; buffered I/O
// exercises the same ring and BlockFile logic.
UringOptions test_options(uint32_t queue_depth) {
  UringOptions o;
  o.queue_depth = queue_depth;
  o.allow_buffered = true;
  return o;
}

}  // namespace

TEST_CASE("io_uring device: more requests than the queue depth all complete") {
  const TempDir tmp;
  require_uring(tmp.path());
  auto device = open_uring_device(tmp.path() + "/raw", /*create=*/true, test_options(4));
  REQUIRE_MESSAGE(device.ok(), device.status().to_string());
  BlockDevice& d = **device;
  MESSAGE(d.describe());
  CHECK(contains(d.describe(), "io_uring QD4"));
  REQUIRE(d.allocate(100 * 4096).ok());
  CHECK(d.size_bytes() == 100 * 4096);
  auto gen = kvtier::test::rng(9);
  // One region for both sides, so registering it covers reads and writes.
  Slots region(200, 4096);
  region.fill_random(gen);
  auto out = [&](size_t i) { return region.at(i); };
  auto in = [&](size_t i) { return region.at(100 + i); };
  for (const bool fixed : {false, true}) {
    CAPTURE(fixed);
    if (fixed) {
      const bool registered = d.register_buffers(region.at(0), 200 * 4096);
      MESSAGE("fixed buffers: ", registered, " (", d.describe(), ")");
      CHECK(contains(d.describe(), registered ? "fixed buffers" : "plain buffers"));
    }
    std::vector<IoRequest> requests;
    std::memset(in(0), 0xa5, 100 * 4096);
    for (uint32_t i = 0; i < 100; ++i) requests.push_back(IoRequest{IoRequest::Op::kWrite, i * 4096ull, out(i), 4096, 0});
    REQUIRE(d.execute(requests).ok());
    for (const IoRequest& r : requests) CHECK(r.result == 4096);
    for (uint32_t i = 0; i < 100; ++i) requests[i] = IoRequest{IoRequest::Op::kRead, i * 4096ull, in(99 - i), 4096, 0};
    REQUIRE(d.execute(requests).ok());
    for (uint32_t i = 0; i < 100; ++i) {
      CHECK(requests[i].result == 4096);
      CHECK(std::memcmp(in(99 - i), out(i), 4096) == 0);
    }
  }
  REQUIRE(d.sync().ok());
}

TEST_CASE("io_uring: blocks round-trip through a real file and a reopen; truncation and foreign files are refused") {
  const TempDir tmp;
  require_uring(tmp.path());
  auto gen = kvtier::test::rng(10);
  const FileGeometry g = small_geometry();
  const std::string path = tmp.path() + "/ctx.kv";
  Slots data(20, 8192);
  data.fill_random(gen);
  uint64_t file_bytes = 0;
  {
    auto file = BlockFile::create(path, g, test_options(8));
    REQUIRE_MESSAGE(file.ok(), file.status().to_string());
    MESSAGE((*file)->device().describe());
    REQUIRE((*file)->write_blocks(ios(data, all_indices(20))).ok());
    check_all_blocks(**file, data);
    REQUIRE((*file)->flush().ok());
    file_bytes = (*file)->device().size_bytes();
    CHECK(file_bytes == 4096 + 4096 + 20 * 8192);
  }
  {
    auto again = BlockFile::create(path, g, test_options(8));
    REQUIRE(!again.ok());
    CHECK(contains(again.status().message(), path + " already exists"));
  }
  {
    auto file = BlockFile::open(path, test_options(8));
    REQUIRE_MESSAGE(file.ok(), file.status().to_string());
    CHECK((*file)->geometry() == g);
    check_all_blocks(**file, data);
  }
  REQUIRE(::truncate(path.c_str(), static_cast<off_t>(file_bytes - 8192)) == 0);
  auto truncated = BlockFile::open(path, test_options(8));
  REQUIRE(!truncated.ok());
  CHECK(truncated.status().code() == StatusCode::kCorrupt);
  CHECK(contains(truncated.status().message(), "truncated: " + path + " is " + std::to_string(file_bytes - 8192) +
                                                   " bytes, header says " + std::to_string(file_bytes)));

  const std::string foreign = tmp.path() + "/foreign.bin";
  {
    Slots junk(4, 4096);
    junk.fill_random(gen);
    const int fd = ::open(foreign.c_str(), O_WRONLY | O_CREAT, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, junk.at(0), 4 * 4096) == 4 * 4096);
    ::close(fd);
  }
  auto refused = BlockFile::open(foreign, test_options(8));
  REQUIRE(!refused.ok());
  CHECK(contains(refused.status().message(), "not a kvtier context file: " + foreign));
}
