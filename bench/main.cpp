// kvtier-bench <suite> [--json] [--quick] [--threads N]: runs one benchmark
// suite and prints its report. Reached as `kvtier bench <suite>`.
#include <boost/program_options.hpp>
#include <iostream>
#include <string>

#include "suites.h"

namespace po = boost::program_options;

namespace {

struct Suite {
  const char* name;
  const char* what;
  int (*run)(const kvtier::bench::SuiteArgs&);
};

constexpr Suite kSuites[] = {
    {"memory", "host memory read/copy bandwidth: the ceiling for CPU attention", kvtier::bench::run_memory},
    {"storage", "io_uring vs thread-pool block I/O on --dir, and batched host->GPU block uploads",
     kvtier::bench::run_storage},
    {"cpu", "CPU attention engine: summary scoring, top-k, host block attention, prefill scoring",
     kvtier::bench::run_cpu},
    {"gpu", "GPU kernels: sparse paged decode, block-sparse prefill, gather, append, summaries", kvtier::bench::run_gpu},
    {"selection", "step-to-step top-k overlap by query correlation, needle recall (synthetic model)",
     kvtier::bench::run_selection},
    {"executor", "the decode executor's own host time per layer step (prepare, plan, the rest): kvtier calibrate's "
                 "host.*_us (a 2-layer Llama-3.1-8B-shaped run at 256K tokens on a GPU, 64K without)",
     kvtier::bench::run_executor},
    {"e2e", "the whole system on the synthetic model: decode steps/s against dense offload, batch 8, prefill, "
            "overlap, fidelity (minutes; --quick: small shape at 256K tokens)",
     kvtier::bench::run_e2e},
};

void print_usage(std::ostream& os, const po::options_description& options) {
  os << "usage: kvtier bench <suite> [options]\n\nsuites:\n";
  for (const Suite& s : kSuites) os << "  " << s.name << "  " << s.what << "\n";
  os << "\n" << options;
}

}  // namespace

int main(int argc, char** argv) {
  po::options_description options("options");
  options.add_options()("help,h", "show this help")("json", po::bool_switch(), "print one JSON object (default: table)")(
      "quick", po::bool_switch(), "smaller sizes, fewer repeats: under a minute on 2 cores")(
      "threads", po::value<unsigned>()->default_value(0), "worker threads (0: all hardware threads)")(
      "dir", po::value<std::string>()->default_value("."),
      "directory for disk benchmark files (storage) and the NVMe tier (e2e)")(
      "suite", po::value<std::string>(), "suite to run");
  po::positional_options_description positional;
  positional.add("suite", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(options).positional(positional).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "kvtier bench: " << e.what() << " (see kvtier bench --help)\n";
    return 2;
  }
  if (vm.count("help") || !vm.count("suite")) {
    print_usage(vm.count("help") ? std::cout : std::cerr, options);
    return vm.count("help") ? 0 : 2;
  }
  const std::string name = vm["suite"].as<std::string>();
  const kvtier::bench::SuiteArgs args{vm["json"].as<bool>(), vm["quick"].as<bool>(), vm["threads"].as<unsigned>(),
                                      vm["dir"].as<std::string>()};
  for (const Suite& s : kSuites)
    if (name == s.name) return s.run(args);
  std::cerr << "kvtier bench: unknown suite '" << name << "' (suites:";
  for (const Suite& s : kSuites) std::cerr << " " << s.name;
  std::cerr << ")\n";
  return 2;
}
