#include "random.h"

#include <cstdio>
#include <cstdlib>

namespace kvtier::test {
namespace {
uint64_t g_seed = 0;
}

void init_seed() {
  if (const char* env = std::getenv("KVTIER_TEST_SEED")) {
    g_seed = std::strtoull(env, nullptr, 0);
  } else {
    g_seed = std::random_device{}();
    g_seed = (g_seed << 32) ^ std::random_device{}();
  }
  std::printf("kvtier tests: seed %llu (set KVTIER_TEST_SEED=%llu to replay)\n",
              static_cast<unsigned long long>(g_seed), static_cast<unsigned long long>(g_seed));
}

uint64_t seed() { return g_seed; }

std::mt19937_64 rng(uint64_t salt) {
  std::seed_seq seq{g_seed, salt, uint64_t{0x6b7674696572}};
  return std::mt19937_64(seq);
}

}  // namespace kvtier::test
