// The benchmark suites of kvtier-bench, one function each.
#pragma once

#include "harness.h"

namespace kvtier::bench {

int run_memory(const SuiteArgs& args);

}  // namespace kvtier::bench
