// The benchmark suites of kvtier-bench, one function each.
#pragma once

#include <string>

#include "harness.h"

namespace kvtier::bench {

int run_memory(const SuiteArgs& args);
int run_storage(const SuiteArgs& args);  // storage_bench.cpp
int run_cpu(const SuiteArgs& args);      // cpu_bench.cpp
int run_gpu(const SuiteArgs& args);      // gpu_bench.cpp
int run_selection(const SuiteArgs& args);  // selection_bench.cpp
int run_e2e(const SuiteArgs& args);        // e2e_bench.cpp
int run_executor(const SuiteArgs& args);   // executor_bench.cpp

// h2d_single_copy_32mib, h2d_block_*, the link curve (h2d_copy_<size>,
// d2h_copy_<size>) and h2d_d2h_duplex_32mib on a GPU host; adds nothing and
// returns a note without a GPU (h2d_bench.cpp).
std::string add_h2d_results(Report& report, const SuiteArgs& args);

}  // namespace kvtier::bench
