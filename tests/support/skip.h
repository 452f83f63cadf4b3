// Skipping a whole test executable when the machine lacks a capability.
// Each suite that needs a GPU, AVX-512 or io_uring is its own executable, so
// exiting 77 (CTest SKIP_RETURN_CODE) reports exactly that suite as skipped.
#pragma once

#include <string_view>

namespace kvtier::test {

// Prints "SKIPPED: <reason>" and exits 77 unless `available`.
void require(bool available, std::string_view reason);

}  // namespace kvtier::test
