// Shared doctest main. KVTIER_TEST_SEED fixes the seed of random inputs so a
// failure replays; otherwise each run draws a fresh seed and prints it.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "random.h"

int main(int argc, char** argv) {
  kvtier::test::init_seed();
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  return context.run();
}
