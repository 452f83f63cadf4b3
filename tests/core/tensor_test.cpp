#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kvtier/core/bf16.h"
#include "kvtier/core/tensor.h"

using namespace kvtier;

TEST_CASE("bf16 rounds to nearest even and keeps NaN") {
  CHECK(bf16::from_float(1.0f).to_float() == 1.0f);
  CHECK(bf16::from_float(-2.5f).to_float() == -2.5f);
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
  CHECK(bf16::from_float(1.0f + 1.0f / 256).to_float() == 1.0f);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go to even (1 + 2^-6).
  CHECK(bf16::from_float(1.0f + 3.0f / 256).to_float() == 1.0f + 1.0f / 64);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(bf16::from_float(nan).to_float()));
  CHECK(std::isinf(bf16::from_float(std::numeric_limits<float>::infinity()).to_float()));
}

TEST_CASE("tensor views index row-major and slice the first dimension") {
  std::vector<float> data(2 * 3 * 4);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  const MutF32View<3> t(data, {2, 3, 4});
  CHECK(t(1, 2, 3) == 23.0f);
  CHECK(t(0, 1, 0) == 4.0f);
  const auto sub = t[1];
  CHECK(sub.shape() == std::array<size_t, 2>{3, 4});
  CHECK(sub(0, 0) == 12.0f);
  sub(2, 1) = -1.0f;
  CHECK(data[1 * 12 + 2 * 4 + 1] == -1.0f);
  const F32View<3> ro = t;  // const view from a mutable one
  CHECK(ro(1, 2, 1) == -1.0f);
}
