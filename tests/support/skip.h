// Skipping a whole test executable when the machine lacks a capability.
// Each suite that needs a GPU, AVX-512 or io_uring is its own executable, so
// exiting 77 (CTest SKIP_RETURN_CODE) reports exactly that suite as skipped.
#pragma once

#include <string_view>

namespace kvtier::test {

// Prints "SKIPPED: <reason>" and exits 77 unless `available`.
void require(bool available, std::string_view reason);

// KVTIER_TEST_QUICK set (and not "0"): the compute-sanitizer sweep
// (tools/gpu-host.sh), which runs smaller sweeps and skips cases that provoke
// a CUDA API error on purpose (the sanitizer counts those as errors).
bool quick_sweep();

}  // namespace kvtier::test
