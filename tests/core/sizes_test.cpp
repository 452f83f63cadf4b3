#include <doctest/doctest.h>

#include "kvtier/core/sizes.h"

using namespace kvtier;

TEST_CASE("token counts use binary multipliers as context lengths are quoted") {
  CHECK(*parse_tokens("131072") == 131072);
  CHECK(*parse_tokens("128K") == 131072);
  CHECK(*parse_tokens("1M") == 1048576);
  CHECK(*parse_tokens(" 4M ") == 4194304);
  CHECK(*parse_tokens("1.5K") == 1536);
  CHECK(*parse_tokens("0") == 0);
}

TEST_CASE("byte sizes: IEC binary, SI decimal, bare letters binary") {
  CHECK(*parse_bytes("512KiB") == 512 * 1024);
  CHECK(*parse_bytes("24GiB") == 24ull << 30);
  CHECK(*parse_bytes("24G") == 24ull << 30);
  CHECK(*parse_bytes("1GB") == 1000000000ull);
  CHECK(*parse_bytes("1.5 GiB") == 3ull << 29);
  CHECK(*parse_bytes("4096") == 4096);
  CHECK(*parse_bytes("4096B") == 4096);
  CHECK(*parse_bytes("16TiB") == 16ull << 40);
}

TEST_CASE("malformed sizes say what was wrong") {
  auto message = [](const Result<uint64_t>& r) { return r.ok() ? std::string("ok") : r.status().message(); };
  CHECK(message(parse_tokens("")).find("empty token count") != std::string::npos);
  CHECK(message(parse_tokens("-5")).find("negative") != std::string::npos);
  CHECK(message(parse_tokens("1MiB")).find("unknown suffix 'MiB'") != std::string::npos);
  CHECK(message(parse_tokens("1.0001K")).find("not a whole number of tokens") != std::string::npos);
  CHECK(message(parse_bytes("24GX")).find("unknown suffix 'GX'") != std::string::npos);
  CHECK(message(parse_bytes("GiB")).find("does not start with a number") != std::string::npos);
  CHECK(message(parse_bytes("0.3B")).find("not a whole number of bytes") != std::string::npos);
  const Result<uint64_t> huge = parse_bytes("99999999999TiB");
  REQUIRE_FALSE(huge.ok());
  CHECK(huge.status().code() == StatusCode::kOutOfRange);
  CHECK(message(parse_bytes("99999999999TiB")).find("64 bits") != std::string::npos);
}

TEST_CASE("formatting round-trips common sizes") {
  CHECK(format_bytes(128ull << 30) == "128 GiB");
  CHECK(format_bytes(1536) == "1.5 KiB");
  CHECK(format_bytes(100) == "100 B");
  CHECK(format_tokens(1048576) == "1M");
  CHECK(format_tokens(131072) == "128K");
  CHECK(format_tokens(1000) == "1000");
  for (uint64_t t : {1ull, 64ull, 1536ull, 131072ull, 3ull << 20})
    CHECK(*parse_tokens(format_tokens(t)) == t);
}
