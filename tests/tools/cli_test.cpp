// The kvtier binary as a user runs it: output formats, exit codes, and
// one-line errors for bad input.
#include <doctest/doctest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace {

struct Run {
  int exit_code = -1;
  std::string out, err;
};

Run run_kvtier(const std::string& args) {
  const std::string err_path = "/tmp/kvtier_cli_test_stderr_" + std::to_string(::getpid());
  const std::string cmd = std::string(KVTIER_BIN_DIR) + "/kvtier " + args + " 2>" + err_path;
  Run r;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) r.out.append(buf.data(), n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream err(err_path);
  std::stringstream ss;
  ss << err.rdbuf();
  r.err = ss.str();
  std::remove(err_path.c_str());
  return r;
}

size_t lines(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

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
                        Case{"bench memory --threads many", "--threads"}}) {
    CAPTURE(c.args);
    const Run r = run_kvtier(c.args);
    CHECK(r.exit_code == 2);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find(c.needle) != std::string::npos);
    CHECK(r.out.empty());
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
