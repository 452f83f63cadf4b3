// `kvtier bench <suite> ...` runs the benchmark program `kvtier-bench` that
// sits beside the kvtier binary, so the CLI does not link every benchmark and
// each benchmark stays a program under bench/.
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <ostream>

#include "cli.h"

namespace kvtier::cli {

int bench_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) {
    err << "kvtier bench: cannot locate this binary through /proc/self/exe: " << ec.message() << "\n";
    return kExitFailure;
  }
  const std::string bench = (self.parent_path() / "kvtier-bench").string();
  std::vector<std::string> argv_strings{bench};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : argv_strings) argv.push_back(s.data());
  argv.push_back(nullptr);
  out.flush();
  err.flush();
  execv(bench.c_str(), argv.data());
  err << "kvtier bench: cannot run " << bench << ": " << std::strerror(errno)
      << " (build the kvtier-bench target: cmake --build build)\n";
  return kExitFailure;
}

}  // namespace kvtier::cli
