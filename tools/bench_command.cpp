// `kvtier bench <suite> ...` runs the benchmark program `kvtier-bench` that
// sits beside the kvtier binary, so the CLI does not link every benchmark and
// each benchmark stays a program under bench/.
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ostream>

#include "child_process.h"
#include "cli.h"

namespace kvtier::cli {

int bench_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  const Result<std::string> program = program_beside_self("kvtier-bench");
  if (!program.ok()) {
    err << "kvtier bench: " << program.status().message() << "\n";
    return kExitFailure;
  }
  const std::string bench = *program;
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
