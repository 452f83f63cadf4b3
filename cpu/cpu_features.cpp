#include "kvtier/cpu/cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kvtier/core/log.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KVT_HAVE_CPUID 1
#else
#define KVT_HAVE_CPUID 0
#endif

namespace kvtier::cpu {
namespace {

struct CpuidRegs {
  uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

constexpr bool bit(uint32_t reg, int n) { return ((reg >> n) & 1u) != 0; }

// XCR0 state components (Intel SDM vol. 1, 13.1). The OS must have enabled
// saving a register file before code may use it, whatever cpuid says.
constexpr uint64_t kXcr0Ymm = (1u << 1) | (1u << 2);                // SSE, AVX
constexpr uint64_t kXcr0Zmm = kXcr0Ymm | (1u << 5) | (1u << 6) | (1u << 7);  // opmask, ZMM_Hi256, Hi16_ZMM
constexpr uint64_t kXcr0Tile = (1u << 17) | (1u << 18);             // XTILECFG, XTILEDATA

#if KVT_HAVE_CPUID

// Returns all zeros for a leaf or subleaf above what the CPU implements.
CpuidRegs cpuid(uint32_t leaf, uint32_t subleaf = 0) {
  CpuidRegs r;
  if (!__get_cpuid_count(leaf, subleaf, &r.eax, &r.ebx, &r.ecx, &r.edx)) return CpuidRegs{};
  return r;
}

// XGETBV through inline asm, so this file needs no -mxsave; callers check
// OSXSAVE first, since the instruction faults when the OS has not enabled it.
uint64_t read_xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

std::string read_vendor() {
  const CpuidRegs r = cpuid(0);
  char text[13] = {};
  std::memcpy(text + 0, &r.ebx, 4);
  std::memcpy(text + 4, &r.edx, 4);
  std::memcpy(text + 8, &r.ecx, 4);
  return text;
}

// The brand string is 48 bytes over leaves 0x80000002..4, NUL-padded and
// often padded with leading or trailing spaces too.
std::string read_brand() {
  if (cpuid(0x80000000).eax < 0x80000004) return {};
  char text[49] = {};
  for (uint32_t i = 0; i < 3; ++i) {
    const CpuidRegs r = cpuid(0x80000002 + i);
    std::memcpy(text + 16 * i + 0, &r.eax, 4);
    std::memcpy(text + 16 * i + 4, &r.ebx, 4);
    std::memcpy(text + 16 * i + 8, &r.ecx, 4);
    std::memcpy(text + 16 * i + 12, &r.edx, 4);
  }
  std::string brand(text);
  const size_t first = brand.find_first_not_of(' ');
  if (first == std::string::npos) return {};
  return brand.substr(first, brand.find_last_not_of(' ') - first + 1);
}

CpuFeatures read_features() {
  CpuFeatures f;
  f.vendor = read_vendor();
  f.model_name = read_brand();
  const uint32_t max_leaf = cpuid(0).eax;
  const CpuidRegs l1 = cpuid(1);
  const uint64_t xcr0 = bit(l1.ecx, 27) ? read_xcr0() : 0;  // OSXSAVE
  const bool ymm = (xcr0 & kXcr0Ymm) == kXcr0Ymm && bit(l1.ecx, 28);  // and AVX
  const bool zmm = ymm && (xcr0 & kXcr0Zmm) == kXcr0Zmm;
  const bool tile = (xcr0 & kXcr0Tile) == kXcr0Tile;
  f.fma = ymm && bit(l1.ecx, 12);
  f.f16c = ymm && bit(l1.ecx, 29);
  if (max_leaf < 7) return f;
  const CpuidRegs l7 = cpuid(7, 0);
  // Subleaf 1 exists only when subleaf 0 reports it in EAX.
  const CpuidRegs l7s1 = l7.eax >= 1 ? cpuid(7, 1) : CpuidRegs{};
  f.avx2 = ymm && bit(l7.ebx, 5);
  f.avx512f = zmm && bit(l7.ebx, 16);
  f.avx512bw = zmm && bit(l7.ebx, 30);
  f.avx512vl = zmm && bit(l7.ebx, 31);
  f.avx512_bf16 = zmm && bit(l7s1.eax, 5);
  f.avx512_fp16 = zmm && bit(l7.edx, 23);
  f.amx_bf16 = tile && bit(l7.edx, 22);
  return f;
}

#else

// Not an x86 CPU: no feature kvtier dispatches on exists, so every kernel
// takes the scalar path.
CpuFeatures read_features() { return CpuFeatures{}; }

#endif

CpuFeatures detect() {
  CpuFeatures f = read_features();
  const char* isa = std::getenv("KVTIER_ISA");
  if (isa != nullptr && *isa != '\0' && !cap_to_isa(f, isa)) {
    KVT_LOG_WARN("ignoring KVTIER_ISA=", isa,
                 ": expected scalar, avx2, avx512 or avx512_bf16");
  }
  return f;
}

}  // namespace

bool cap_to_isa(CpuFeatures& f, std::string_view isa) {
  // Rank of the cap: each level keeps its own features and those below it.
  int rank = -1;
  if (isa == "scalar") rank = 0;
  if (isa == "avx2") rank = 1;
  if (isa == "avx512") rank = 2;
  if (isa == "avx512_bf16") rank = 3;
  if (rank < 0) return false;
  if (rank < 1) f.avx2 = f.fma = f.f16c = false;
  if (rank < 2) f.avx512f = f.avx512bw = f.avx512vl = false;
  if (rank < 3) f.avx512_bf16 = false;
  // Nothing kvtier names sits above avx512_bf16 yet, so fp16 and AMX go at
  // every cap: a forced path must not still see a faster one.
  f.avx512_fp16 = f.amx_bf16 = false;
  return true;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* best_isa(const CpuFeatures& f) {
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl;
  if (avx512 && f.avx512_bf16) return "avx512_bf16";
  if (avx512) return "avx512";
  if (f.avx2 && f.fma) return "avx2";
  return "scalar";
}

}  // namespace kvtier::cpu
