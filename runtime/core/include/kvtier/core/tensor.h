// Non-owning, row-major tensor views with the rank in the type and the shape
// checked against the span's length at construction.
#pragma once

#include <array>
#include <cstddef>
#include <span>
#include <type_traits>

#include "kvtier/core/assert.h"
#include "kvtier/core/bf16.h"

namespace kvtier {

// Product of a shape's extents.
template <size_t N>
constexpr size_t element_count(const std::array<size_t, N>& shape) {
  size_t n = 1;
  for (size_t e : shape) n *= e;
  return n;
}

template <class T, size_t Rank>
class TensorView {
  static_assert(Rank >= 1 && Rank <= 4, "ranks 1 to 4 are supported");

 public:
  using Shape = std::array<size_t, Rank>;

  TensorView() = default;
  // data must hold exactly the product of shape's extents.
  TensorView(std::span<T> data, Shape shape) : data_(data), shape_(shape) {
    KVT_ASSERT(data.size() == element_count(shape), "tensor span has ", data.size(),
               " elements, shape needs ", element_count(shape));
  }
  // Views of const T from views of T.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  TensorView(TensorView<U, Rank> other)  // NOLINT: implicit const conversion
      : data_(other.data()), shape_(other.shape()) {}

  const Shape& shape() const { return shape_; }
  size_t extent(size_t dim) const { return shape_[dim]; }
  size_t size() const { return data_.size(); }
  std::span<T> data() const { return data_; }

  // Element access with bounds checked on every index.
  template <class... I>
    requires(sizeof...(I) == Rank)
  T& operator()(I... idx) const {
    return data_[offset(Shape{static_cast<size_t>(idx)...})];
  }
  // The sub-tensor at index i of the first dimension.
  auto operator[](size_t i) const
    requires(Rank > 1)
  {
    KVT_ASSERT(i < shape_[0], "index ", i, " out of extent ", shape_[0]);
    std::array<size_t, Rank - 1> sub{};
    for (size_t d = 1; d < Rank; ++d) sub[d - 1] = shape_[d];
    const size_t stride = element_count(sub);
    return TensorView<T, Rank - 1>(data_.subspan(i * stride, stride), sub);
  }
 private:
  size_t offset(const Shape& idx) const {
    size_t off = 0;
    for (size_t d = 0; d < Rank; ++d) {
      KVT_ASSERT(idx[d] < shape_[d], "index ", idx[d], " out of extent ", shape_[d], " in dim ", d);
      off = off * shape_[d] + idx[d];
    }
    return off;
  }

  std::span<T> data_;
  Shape shape_{};
};

template <size_t Rank> using Bf16View = TensorView<const bf16, Rank>;
template <size_t Rank> using MutBf16View = TensorView<bf16, Rank>;
template <size_t Rank> using F32View = TensorView<const float, Rank>;
template <size_t Rank> using MutF32View = TensorView<float, Rank>;

}  // namespace kvtier
