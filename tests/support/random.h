// Random inputs for tests: one process-wide seed (printed, overridable with
// KVTIER_TEST_SEED) and helpers that fill bf16/fp32 buffers.
#pragma once

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kvtier/core/bf16.h"

namespace kvtier::test {

// Reads KVTIER_TEST_SEED or draws one, and prints it.
void init_seed();
uint64_t seed();
// A generator seeded from the process seed and a per-call salt, so each test
// case draws its own stream and replays alone.
std::mt19937_64 rng(uint64_t salt);

inline std::vector<bf16> random_bf16(size_t n, std::mt19937_64& gen, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<bf16> out(n);
  for (bf16& x : out) x = bf16::from_float(dist(gen));
  return out;
}

// A value no correct kernel writes: a signalling-looking NaN for fp32/fp64.
template <class T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

}  // namespace kvtier::test
