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

}  // namespace kvtier::test
