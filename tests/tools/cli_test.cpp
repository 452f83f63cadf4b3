// The kvtier binary as a user runs it: output formats, exit codes, and
// one-line errors for bad input.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "run_kvtier.h"

using kvtier::test::check_usage_error;
using kvtier::test::lines;
using kvtier::test::Run;
using kvtier::test::run_kvtier;

TEST_CASE("kvtier info --json prints the documented keys") {
  const Run r = run_kvtier("info --json --dir /tmp");
  REQUIRE(r.exit_code == 0);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  for (const char* key : {"cpu", "memory_bytes", "gpus", "io_uring", "versions"}) CHECK(j.contains(key));
  CHECK(j["gpus"].is_array());
  CHECK(j["memory_bytes"].get<uint64_t>() > (uint64_t{256} << 20));
  CHECK(j["io_uring"]["available"].is_boolean());
  CHECK(j["io_uring"]["o_direct"].is_boolean());
  CHECK((j["io_uring"]["error"].is_null() || j["io_uring"]["error"].is_string()));
  CHECK(!j["cpu"]["model"].get<std::string>().empty());
  CHECK(j["cpu"]["isa"].contains("avx512_bf16"));
  CHECK(!j["versions"]["onednn"].get<std::string>().empty());
  CHECK(!j["versions"]["onetbb"].get<std::string>().empty());
}

TEST_CASE("kvtier info prints text by default") {
  const Run r = run_kvtier("info");
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("cpu ") != std::string::npos);
  CHECK(r.out.find("io_uring") != std::string::npos);
}

TEST_CASE("bad usage is one line naming the problem, exit code 2") {
  struct Case {
    const char* args;
    const char* needle;
  };
  for (const Case& c : {Case{"info --frobnicate", "--frobnicate"}, Case{"frobnicate", "unknown command 'frobnicate'"},
                        Case{"info --dir /nonexistent/kvtier", "/nonexistent/kvtier"},
                        Case{"info --dir", "--dir"}, Case{"bench nosuchsuite", "unknown suite 'nosuchsuite'"},
                        Case{"bench memory --threads many", "--threads"},
                        Case{"calibrate --frobnicate", "--frobnicate"},
                        Case{"calibrate --gpu gtx480", "unknown --gpu preset 'gtx480'"},
                        Case{"calibrate --gpu rtx4090 --dir /nonexistent/kvtier", "/nonexistent/kvtier"},
                        Case{"calibrate --gpu rtx4090 --out /nonexistent/kvtier/p.json", "/nonexistent/kvtier/p.json"},
                        Case{"calibrate --gpu rtx4090 --out /tmp", "cannot write --out '/tmp': is a directory"}}) {
    check_usage_error(c.args, c.needle);
  }
}

TEST_CASE("kvtier bench memory --quick --json follows the report schema") {
  const Run r = run_kvtier("bench memory --quick --json --threads 2");
  REQUIRE(r.exit_code == 0);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  CHECK(j["bench"] == "memory");
  CHECK(j.contains("machine"));
  CHECK(j.contains("config"));
  REQUIRE(j["results"].size() >= 2);
  for (const auto& row : j["results"]) {
    CHECK(row["value"].get<double>() > 0);
    CHECK(!row["unit"].get<std::string>().empty());
    if (row["baseline"].is_null()) continue;
    // ratio is value / the named baseline's value, measured in the same run.
    bool found = false;
    for (const auto& b : j["results"])
      if (b["name"] == row["baseline"]) {
        found = true;
        CHECK(row["ratio"].get<double>() == doctest::Approx(row["value"].get<double>() / b["value"].get<double>()));
      }
    CHECK(found);
  }
}

TEST_CASE("kvtier calibrate without a GPU needs --gpu, before any benchmark runs") {
  const nlohmann::json info = nlohmann::json::parse(run_kvtier("info --json --dir /tmp").out);
  if (!info["gpus"].empty()) return;  // on a GPU host this would run the full calibration
  const Run r = run_kvtier("calibrate --quick --out /tmp/kvtier-cli-test-never-written.json");
  CHECK(r.exit_code == 2);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("no GPU") != std::string::npos);
  CHECK(r.err.find("--gpu PRESET") != std::string::npos);
  CHECK(r.err.find("running") == std::string::npos);
}
