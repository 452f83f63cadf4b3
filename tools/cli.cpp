#include "cli.h"

#include <ostream>

namespace kvtier::cli {
namespace {

constexpr const char* kUsage =
    "usage: kvtier <command> [options]\n"
    "\n"
    "commands:\n"
    "  demo       kvtier's main job: prefill and decode a long context of a synthetic\n"
    "             model with its KV over GPU, host RAM and NVMe; prints placement,\n"
    "             speed, overlap and fidelity (1M tokens with a GPU; kvtier demo --help)\n"
    "  info       describe this machine: CPU features, cores and NUMA, RAM, GPUs,\n"
    "             io_uring and O_DIRECT, library versions (--json, --dir PATH)\n"
    "  bench      run a benchmark suite and print JSON (kvtier bench --help)\n"
    "  calibrate  measure this machine with the benchmark suites and write its\n"
    "             machine profile for the simulator (kvtier calibrate --help)\n"
    "  plan       predict fit, placement and speed of a model at a context length\n"
    "             on a machine, or sweep contexts into a table and SVG plot\n"
    "             (kvtier plan --help)\n"
    "\n"
    "kvtier <command> --help shows a command's options.\n";

}  // namespace

int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty()) {
    err << kUsage;
    return kExitUsage;
  }
  const std::string& command = args.front();
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (command == "info") return info_command(rest, out, err);
  if (command == "bench") return bench_command(rest, out, err);
  if (command == "calibrate") return calibrate_command(rest, out, err);
  if (command == "plan") return plan_command(rest, out, err);
  if (command == "demo") return demo_command(rest, out, err);
  if (command == "help" || command == "--help" || command == "-h") {
    out << kUsage;
    return kExitOk;
  }
  if (command == "--version") {
    out << "kvtier " << KVTIER_VERSION << "\n";
    return kExitOk;
  }
  err << "kvtier: unknown command '" << command << "' (commands: demo, info, bench, calibrate, plan; see kvtier --help)\n";
  return kExitUsage;
}

}  // namespace kvtier::cli
