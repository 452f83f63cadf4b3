#include "kvtier/storage/crc32c.h"

#include <doctest/doctest.h>

#include <cstring>
#include <string_view>
#include <vector>

#include "random.h"

namespace {

using kvtier::storage::crc32c;
using kvtier::storage::crc32c_portable;

std::vector<unsigned char> random_bytes(size_t n, std::mt19937_64& gen) {
  std::vector<unsigned char> out(n);
  for (auto& b : out) b = static_cast<unsigned char>(gen());
  return out;
}

}  // namespace

TEST_CASE("crc32c matches the published check values") {
  constexpr std::string_view kCheck = "123456789";
  CHECK(crc32c(kCheck.data(), kCheck.size()) == 0xE3069283u);
  CHECK(crc32c_portable(kCheck.data(), kCheck.size()) == 0xE3069283u);
  const unsigned char zeros[32] = {};
  CHECK(crc32c(zeros, sizeof zeros) == 0x8A9136AAu);
  CHECK(crc32c_portable(zeros, sizeof zeros) == 0x8A9136AAu);
  // RFC 3720 B.4: 32 bytes of 0xff, and 0x00..0x1f ascending.
  unsigned char ones[32], ascending[32];
  std::memset(ones, 0xff, sizeof ones);
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<unsigned char>(i);
  CHECK(crc32c(ones, sizeof ones) == 0x62A8AB43u);
  CHECK(crc32c(ascending, sizeof ascending) == 0x46DD794Eu);
  CHECK(crc32c(nullptr, 0) == 0u);
}

TEST_CASE("the dispatched crc32c equals the portable one on odd lengths and alignments") {
  auto gen = kvtier::test::rng(0xc3c);
  const std::vector<unsigned char> data = random_bytes(10000 + 64, gen);
  std::vector<size_t> lengths = {0, 1, 7, 8, 9, 63, 64, 65, 4095, 4096, 4097, 6143, 6144, 6145, 10000};
  for (int i = 0; i < 300; ++i) lengths.push_back(gen() % 10001);
  for (size_t n : lengths) {
    for (size_t misalign : {0, 1, 3, 5, 8, 13}) {
      CAPTURE(n);
      CAPTURE(misalign);
      const unsigned char* p = data.data() + misalign;
      REQUIRE(crc32c(p, n) == crc32c_portable(p, n));
    }
  }
}

TEST_CASE("the 3-stream path agrees on long buffers with a non-zero start") {
  auto gen = kvtier::test::rng(0x3570);
  const std::vector<unsigned char> data = random_bytes(3 * 32768 + 11, gen);
  for (size_t n : {size_t{32768}, size_t{6144 * 5 + 17}, data.size()}) {
    CAPTURE(n);
    CHECK(crc32c(data.data(), n, 0x12345678u) == crc32c_portable(data.data(), n, 0x12345678u));
  }
}

TEST_CASE("crc32c continues across pieces") {
  auto gen = kvtier::test::rng(0x1ac);
  const std::vector<unsigned char> data = random_bytes(20000, gen);
  const uint32_t whole = crc32c(data.data(), data.size());
  for (int i = 0; i < 50; ++i) {
    const size_t cut = gen() % (data.size() + 1);
    CAPTURE(cut);
    CHECK(crc32c(data.data() + cut, data.size() - cut, crc32c(data.data(), cut)) == whole);
    CHECK(crc32c_portable(data.data() + cut, data.size() - cut, crc32c_portable(data.data(), cut)) == whole);
  }
  // Byte by byte through the portable path, too.
  uint32_t crc = 0;
  for (size_t i = 0; i < 1000; ++i) crc = crc32c_portable(data.data() + i, 1, crc);
  CHECK(crc == crc32c(data.data(), 1000));
}
