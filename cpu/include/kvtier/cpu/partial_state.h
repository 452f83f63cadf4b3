// Partial attention states and their exact merge (DESIGN.md section 10).
//
// A partial state of one q head over a token set S is
//   o = sum_t exp(s_t - m) v_t / l,   lse = m + ln(l),   m = max_t s_t, l = sum_t exp(s_t - m);
// the empty set is (o = 0, lse = -inf). States over disjoint sets merge exactly:
//   M = max_i lse_i,  w_i = exp(lse_i - M),  o = sum_i w_i o_i / sum_i w_i,  lse = M + ln(sum_i w_i).
// Every kernel, CPU or GPU, returns one; merge_states() lets work move between devices.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "kvtier/core/assert.h"

namespace kvtier::cpu {

// Owning partial state for `heads` q heads: o [heads][head_dim], lse [heads].
// T is float for kernels and double for the fp64 reference.
template <class T>
struct BasicPartialState {
  uint32_t heads = 0;
  uint32_t head_dim = 0;
  std::vector<T> o;    // [heads][head_dim], normalised output
  std::vector<T> lse;  // [heads], natural log; -inf for an empty set

  static BasicPartialState empty(uint32_t heads, uint32_t head_dim) {
    return {heads, head_dim, std::vector<T>(size_t{heads} * head_dim, T(0)),
            std::vector<T>(heads, -std::numeric_limits<T>::infinity())};
  }
  std::span<const T> o_row(uint32_t h) const { return std::span<const T>(o).subspan(size_t{h} * head_dim, head_dim); }
  std::span<T> o_row(uint32_t h) { return std::span<T>(o).subspan(size_t{h} * head_dim, head_dim); }
};

using PartialState = BasicPartialState<float>;
using PartialState64 = BasicPartialState<double>;

// Merges states over disjoint token sets into one. All inputs must have the
// same heads and head_dim; merging only empty states gives an empty state.
template <class T>
BasicPartialState<T> merge_states(std::span<const BasicPartialState<T>> parts) {
  KVT_ASSERT(!parts.empty(), "merge_states needs at least one state");
  const uint32_t heads = parts[0].heads, dim = parts[0].head_dim;
  BasicPartialState<T> out = BasicPartialState<T>::empty(heads, dim);
  for (const auto& p : parts)
    KVT_ASSERT(p.heads == heads && p.head_dim == dim, "state ", p.heads, "x", p.head_dim, " vs ", heads, "x", dim);
  for (uint32_t h = 0; h < heads; ++h) {
    T m = -std::numeric_limits<T>::infinity();
    for (const auto& p : parts) m = std::max(m, p.lse[h]);
    // Every part empty: (-inf) - (-inf) would be NaN, so keep the empty state.
    if (m == -std::numeric_limits<T>::infinity()) continue;
    T wsum = 0;
    std::span<T> o = out.o_row(h);
    for (const auto& p : parts) {
      const T w = std::exp(p.lse[h] - m);
      wsum += w;
      const std::span<const T> po = p.o_row(h);
      for (uint32_t d = 0; d < dim; ++d) o[d] += w * po[d];
    }
    for (uint32_t d = 0; d < dim; ++d) o[d] /= wsum;
    out.lse[h] = m + std::log(wsum);
  }
  return out;
}

}  // namespace kvtier::cpu
