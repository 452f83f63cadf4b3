// `kvtier demo` input checks as a user meets them: every bad option is one
// line on stderr naming the option and the fix, exit code 2, before any work
// starts (the demo itself is slow; tools_demo_small_test runs a tiny one).
#include <doctest/doctest.h>

#include <string>

#include "run_kvtier.h"

using kvtier::test::check_usage_error;
using kvtier::test::Run;
using kvtier::test::run_kvtier;

TEST_CASE("kvtier demo --help lists the options with their defaults") {
  const Run r = run_kvtier("demo --help");
  REQUIRE(r.exit_code == 0);
  for (const char* option : {"--model", "--context", "--gpu-bytes", "--host-bytes", "--dir", "--steps", "--batch",
                             "--device", "--threads", "--late", "--rho", "--verify-every", "--needles", "--trace",
                             "--json", "--topk", "--window", "--sinks", "--chunk", "--progress"})
    CHECK_MESSAGE(r.out.find(option) != std::string::npos, option);
}

TEST_CASE("kvtier demo: bad input is one line naming the option, exit code 2") {
  struct Case {
    const char* args;
    const char* needle;
  };
  for (const Case& c : {Case{"demo --device tpu", "--device 'tpu'"},
                        Case{"demo --context 0", "--context '0'"},
                        Case{"demo --context lots", "--context 'lots'"},
                        Case{"demo --late bogus", "--late"},
                        Case{"demo --model gpt-5", "--model"},
                        Case{"demo --gpu-bytes garbage", "--gpu-bytes 'garbage'"},
                        Case{"demo --host-bytes 0", "--host-bytes '0'"},
                        Case{"demo --rho 1.5", "--rho '1.5'"},
                        Case{"demo --steps 0", "--steps '0'"},
                        Case{"demo --batch 1000", "--batch '1000'"},
                        Case{"demo --needles many", "--needles 'many'"},
                        Case{"demo --chunk 48", "--chunk"},
                        Case{"demo --topk 0", "--topk '0'"},
                        Case{"demo --layers 0", "--layers '0'"},
                        Case{"demo --dir /nonexistent/kvtier-demo-test", "--dir"},
                        Case{"demo --trace /nonexistent/dir/trace.json", "--trace"},
                        Case{"demo --frobnicate", "--frobnicate"}}) {
    check_usage_error(c.args, c.needle);
  }
}

TEST_CASE("kvtier demo: an unknown model lists the known ones") {
  const Run r = run_kvtier("demo --model gpt-5");
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("gpt-5") != std::string::npos);
  CHECK(r.err.find("llama-3.1-8b") != std::string::npos);
}
