// Runs the built kvtier binary as a user would, in a subprocess, and
// collects its exit code, stdout and stderr.
#pragma once

#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

namespace kvtier::test {

struct Run {
  int exit_code = -1;
  std::string out, err;
};

// `args` goes to the shell after the binary's path.
inline Run run_kvtier(const std::string& args) {
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

inline size_t lines(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// A usage error: exit 2, one line on stderr containing `needle`, nothing on stdout.
inline void check_usage_error(const std::string& args, const std::string& needle) {
  CAPTURE(args);
  const Run r = run_kvtier(args);
  CHECK(r.exit_code == 2);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find(needle) != std::string::npos);
  CHECK(r.out.empty());
}

}  // namespace kvtier::test
