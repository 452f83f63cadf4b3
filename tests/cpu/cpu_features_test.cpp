#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "kvtier/cpu/cpu_features.h"

namespace {

using kvtier::cpu::CpuFeatures;

// The flags of the first processor in /proc/cpuinfo; empty when there is no
// such file (not Linux, or /proc not mounted).
std::set<std::string> proc_cpuinfo_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    std::set<std::string> flags;
    for (std::string w; words >> w;) flags.insert(w);
    return flags;
  }
  return {};
}

int isa_rank(const std::string& isa) {
  if (isa == "avx512_bf16") return 3;
  if (isa == "avx512") return 2;
  if (isa == "avx2") return 1;
  return isa == "scalar" ? 0 : -1;
}

CpuFeatures all_features() {
  CpuFeatures f;
  f.avx2 = f.fma = f.f16c = true;
  f.avx512f = f.avx512bw = f.avx512vl = true;
  f.avx512_bf16 = f.avx512_fp16 = f.amx_bf16 = true;
  return f;
}

}  // namespace

TEST_CASE("cpu_features agrees with the kernel's flags in /proc/cpuinfo") {
  const std::set<std::string> flags = proc_cpuinfo_flags();
  const char* cap = std::getenv("KVTIER_ISA");
  if (flags.empty() || (cap != nullptr && *cap != '\0')) {
    MESSAGE("no /proc/cpuinfo flags, or KVTIER_ISA set: comparison skipped");
    return;
  }
  const CpuFeatures& f = kvtier::cpu::cpu_features();
  // The kernel clears a flag when it does not save the matching register
  // state, which is the same XCR0 condition cpu_features() applies.
  CHECK(f.avx2 == flags.count("avx2"));
  CHECK(f.avx512f == flags.count("avx512f"));
  CHECK(f.avx512_bf16 == flags.count("avx512_bf16"));
  CHECK(f.avx512_fp16 == flags.count("avx512_fp16"));
  CHECK(f.amx_bf16 == flags.count("amx_bf16"));
}

TEST_CASE("cpu_features names the CPU and its best ISA is consistent") {
  const CpuFeatures& f = kvtier::cpu::cpu_features();
  MESSAGE("vendor '", f.vendor, "', model '", f.model_name, "', best ISA ",
          std::string(kvtier::cpu::best_isa(f)));
  CHECK(!f.vendor.empty());
  CHECK(!f.model_name.empty());
  CHECK(f.model_name.front() != ' ');
  CHECK(f.model_name.back() != ' ');
  const std::string best = kvtier::cpu::best_isa(f);
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl;
  CHECK(best == (avx512 && f.avx512_bf16 ? "avx512_bf16"
                 : avx512                ? "avx512"
                 : f.avx2 && f.fma       ? "avx2"
                                         : "scalar"));
  const char* cap = std::getenv("KVTIER_ISA");
  if (cap != nullptr && isa_rank(cap) >= 0) CHECK(isa_rank(best) <= isa_rank(cap));
}

TEST_CASE("cap_to_isa clears exactly the features above the cap") {
  for (const char* isa : {"scalar", "avx2", "avx512", "avx512_bf16"}) {
    CAPTURE(isa);
    CpuFeatures f = all_features();
    REQUIRE(kvtier::cpu::cap_to_isa(f, isa));
    CHECK(std::string(kvtier::cpu::best_isa(f)) == isa);
    CHECK(!f.avx512_fp16);
    CHECK(!f.amx_bf16);
  }
  // A cap never adds a feature the CPU lacks.
  CpuFeatures none;
  REQUIRE(kvtier::cpu::cap_to_isa(none, "avx512_bf16"));
  CHECK(std::string(kvtier::cpu::best_isa(none)) == "scalar");
}

TEST_CASE("cap_to_isa rejects an unknown name and leaves the features alone") {
  CpuFeatures f = all_features();
  CHECK(!kvtier::cpu::cap_to_isa(f, "avx512bf16"));
  CHECK(!kvtier::cpu::cap_to_isa(f, ""));
  CHECK(f.amx_bf16);
  CHECK(std::string(kvtier::cpu::best_isa(f)) == "avx512_bf16");
}
