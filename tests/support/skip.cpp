#include "skip.h"

#include <cstdio>
#include <cstdlib>

namespace kvtier::test {

void require(bool available, std::string_view reason) {
  if (available) return;
  std::printf("SKIPPED: %.*s\n", static_cast<int>(reason.size()), reason.data());
  std::fflush(stdout);
  std::_Exit(77);
}

bool quick_sweep() {
  const char* q = std::getenv("KVTIER_TEST_QUICK");
  return q != nullptr && std::string_view(q) != "0";
}

}  // namespace kvtier::test
