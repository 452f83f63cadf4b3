// CPU model and the ISA features kvtier's kernels dispatch on, read from
// cpuid (and XGETBV for whether the OS saves the wider register state).
//
// KVTIER_ISA=scalar|avx2|avx512|avx512_bf16, read once on the first call to
// cpu_features(), caps what it reports: every feature above the named level
// is cleared, so a test or a user can force a slower kernel path on a faster
// CPU (it never adds a feature the CPU lacks). The levels, in order:
//   scalar       clears avx2, fma, f16c and everything AVX-512 or AMX;
//   avx2         clears everything AVX-512 or AMX;
//   avx512       clears avx512_bf16, avx512_fp16 and amx_bf16;
//   avx512_bf16  clears avx512_fp16 and amx_bf16.
// Any other value is ignored with a warning on stderr.
#pragma once

#include <string>
#include <string_view>

namespace kvtier::cpu {

struct CpuFeatures {
  std::string vendor;      // "GenuineIntel", "AuthenticAMD", ...
  std::string model_name;  // brand string, e.g. "Intel(R) Xeon(R) Platinum 8480+"
  bool avx2 = false;       // AVX2, with OS support for YMM state
  bool fma = false;        // FMA3, with OS support for YMM state
  bool f16c = false;
  bool avx512f = false;    // with OS support for ZMM/opmask state
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  bool amx_bf16 = false;   // CPU reports it and the OS enables tile state (XCR0)
};

// Read once per process, thread-safe. Honours KVTIER_ISA (see above).
const CpuFeatures& cpu_features();

// The best kernel ISA this CPU supports: "avx512_bf16", "avx512", "avx2" or "scalar".
const char* best_isa(const CpuFeatures& f);

// Clears the features above `isa` ("scalar", "avx2", "avx512" or
// "avx512_bf16"), as KVTIER_ISA does. False, leaving f unchanged, on any
// other name.
bool cap_to_isa(CpuFeatures& f, std::string_view isa);

}  // namespace kvtier::cpu
