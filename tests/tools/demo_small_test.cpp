// A tiny `kvtier demo` end to end on the CPU backend: 2 layers of the small
// shape at 16K tokens, every decode step verified against dense attention,
// and the --json report's figures within their ranges.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "run_kvtier.h"
#include "temp_dir.h"

using kvtier::test::Run;
using kvtier::test::run_kvtier;
using kvtier::test::TempDir;

TEST_CASE("kvtier demo --json on a tiny CPU run reports sane figures") {
  const TempDir dir("kvtier-demo-test");
  const Run r = run_kvtier("demo --device cpu --layers 2 --context 16384 --steps 2 --verify-every 1 --needles 3 "
                           "--json --dir " + dir.path().string());
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.err.find('\r') == std::string::npos);  // no progress bar when stderr is not a terminal
  const nlohmann::json j = nlohmann::json::parse(r.out);
  for (const char* key : {"backend", "decode_steps_per_s", "rel_error_p50", "needle_recall", "verified"})
    REQUIRE_MESSAGE(j.contains(key), key);
  CHECK(j["decode_steps_per_s"].get<double>() > 0);
  const double rel_error = j["rel_error_p50"].get<double>();
  CHECK(std::isfinite(rel_error));
  CHECK(rel_error >= 0);
  CHECK(rel_error < 1);
  CHECK(j["verified"].get<double>() >= 1);
  const double recall = j["needle_recall"].get<double>();
  CHECK(recall >= 0);
  CHECK(recall <= 1);
  REQUIRE(j.contains("demo"));
  CHECK(j["demo"]["context_tokens"] == 16384);
  CHECK(j["demo"]["nvme_dir"] == dir.path().string());
}
