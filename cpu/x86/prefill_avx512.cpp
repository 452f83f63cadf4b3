// Prefill scoring, query block x summaries, with AVX512_BF16 dot products.
// The summaries come packed in VNNI pairs, so one vdpbf16ps multiplies a
// broadcast pair of a query row (q[i][2p], q[i][2p+1]) with that pair of 16
// summaries and adds both products into 16 fp32 sums: one instruction per
// 16 outputs and 2 k, with no horizontal reduction at the end.
#include "prefill_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <utility>

namespace kvtier::cpu::x86 {
namespace {

// 6 rows x 4 groups = 24 accumulators, plus 4 summary vectors and a
// broadcast: 29 of the 32 zmm registers, so nothing spills.
constexpr int kRows = 6;
constexpr int kGroups = kPrefillPanelColumns / 16;

struct Tile {
  const bf16* q;              // the tile's first query row
  uint32_t k;
  const uint32_t* b;          // the tile's panel, pair 0
  float* c;                   // scores at (first row, first column of the panel)
  uint32_t ldc;
  __mmask16 last_mask;        // columns of the tile's last group that exist
};

template <int R, int C, class PairOf>
inline void step(__m512 (&acc)[R][C], const Tile& t, uint32_t p, const PairOf& pair_of) {
  __m512bh b[C];
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) b[c] = (__m512bh)_mm512_loadu_si512(t.b + size_t{p} * kPrefillPanelColumns + c * 16);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair_of(r)));
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
  }
}

// An R x (16 C) block of scores, accumulated over all k.
template <int R, int C>
void micro(const Tile& t) {
  __m512 acc[R][C];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  const uint32_t full = t.k / 2;
  for (uint32_t p = 0; p < full; ++p)
    step<R, C>(acc, t, p, [&](int r) {
      uint32_t v;
      std::memcpy(&v, t.q + size_t(r) * t.k + 2 * p, sizeof v);
      return v;
    });
  // An odd k ends with half a pair; the packed summaries are zero in the other half.
  if (t.k & 1)
    step<R, C>(acc, t, full, [&](int r) { return uint32_t{t.q[size_t(r) * t.k + t.k - 1].bits}; });
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      float* dst = t.c + size_t(r) * t.ldc + c * 16;
      if (c == C - 1)
        _mm512_mask_storeu_ps(dst, t.last_mask, acc[r][c]);
      else
        _mm512_storeu_ps(dst, acc[r][c]);
    }
}

using MicroFn = void (*)(const Tile&);

template <int... I>
constexpr std::array<MicroFn, sizeof...(I)> micro_table(std::integer_sequence<int, I...>) {
  return {&micro<I / kGroups + 1, I % kGroups + 1>...};
}
// kMicro[(rows - 1) * kGroups + groups - 1]: every tail shape has its own unrolled kernel.
constexpr auto kMicro = micro_table(std::make_integer_sequence<int, kRows * kGroups>{});

}  // namespace

void prefill_tile_avx512bf16(const PrefillArgs& a, uint32_t row_begin, uint32_t row_end, uint32_t panel_begin,
                             uint32_t panel_end) {
  const uint32_t panels_total = (a.n + kPrefillPanelColumns - 1) / kPrefillPanelColumns;
  // Panels outside, rows inside: a panel at k = 128 is 16 KiB, so it stays in
  // L1 while every row of the tile passes it.
  for (uint32_t panel = panel_begin; panel < panel_end; ++panel) {
    const uint32_t first_column = panel * kPrefillPanelColumns;
    const uint32_t columns = panel + 1 == panels_total ? a.n - first_column : kPrefillPanelColumns;
    const uint32_t groups = (columns + 15) / 16, tail = columns - (groups - 1) * 16;
    const auto last_mask = static_cast<__mmask16>((1u << tail) - 1);
    for (uint32_t i = row_begin; i < row_end; i += kRows) {
      const uint32_t rows = std::min<uint32_t>(kRows, row_end - i);
      const Tile t{a.q + size_t{i} * a.k, a.k, a.packed + size_t{panel} * a.pairs * kPrefillPanelColumns,
                   a.scores + size_t{i} * a.n + first_column, a.n, last_mask};
      kMicro[(rows - 1) * kGroups + (groups - 1)](t);
    }
  }
}

}  // namespace kvtier::cpu::x86
