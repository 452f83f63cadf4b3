// Shared doctest main. KVTIER_TEST_SEED fixes the seed of random inputs so a
// failure replays; otherwise each run draws a fresh seed and prints it. A
// crash prints a backtrace (suites link with -rdynamic so it has names).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstdlib>

#include "random.h"

namespace {

void on_crash(int sig) {
  void* frames[64];
  const int n = backtrace(frames, 64);
  const char msg[] = "\nkvtier tests: fatal signal; backtrace:\n";
  (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGSEGV, on_crash);
  signal(SIGABRT, on_crash);
  signal(SIGBUS, on_crash);
  kvtier::test::init_seed();
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  const int rc = context.run();
  std::fflush(nullptr);
  return rc;
}
