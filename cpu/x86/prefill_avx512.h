// Prefill scoring tiles for AVX512_BF16 (cpu/x86/prefill_avx512.cpp, compiled
// with AVX-512 + BF16 flags): called by CpuEngine::prefill_scores_own only
// after cpuid reported avx512_bf16.
#pragma once

#include <cstdint>

#include "kvtier/core/bf16.h"

namespace kvtier::cpu::x86 {

// Columns per panel of packed summaries: 4 vectors of 16 fp32 sums.
inline constexpr uint32_t kPrefillPanelColumns = 64;

struct PrefillArgs {
  const bf16* q;           // [m][k] bf16, row-major
  uint32_t k;              // head_dim
  // Summaries as VNNI pairs, [(n + 63) / 64 panels][pairs][64 columns] uint32:
  // column j of a panel, pair p holds kmean[j][2p] (low) and [2p + 1] (high),
  // zero past n or k, so one pair of a panel is 256 contiguous bytes.
  const uint32_t* packed;
  uint32_t pairs;          // (k + 1) / 2
  float* scores;           // [m][n] fp32, row-major
  uint32_t n;              // summaries (columns of scores)
};

// scores[i][j] = sum_d q[i][d] * kmean[j][d] for rows [row_begin, row_end)
// and the columns of panels [panel_begin, panel_end); fp32 accumulation.
void prefill_tile_avx512bf16(const PrefillArgs& args, uint32_t row_begin, uint32_t row_end, uint32_t panel_begin,
                             uint32_t panel_end);

}  // namespace kvtier::cpu::x86
