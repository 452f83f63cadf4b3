// ModelShape: the attention geometry of a model, and its validation.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/core/status.h"

namespace kvtier {

enum class DType : uint8_t { kBf16, kF16, kF32 };

std::string_view dtype_name(DType dtype);
Result<DType> parse_dtype(std::string_view text);
uint32_t dtype_bytes(DType dtype);

struct ModelShape {
  uint32_t layers = 32;
  uint32_t q_heads = 32;
  uint32_t kv_heads = 8;
  uint32_t head_dim = 128;
  DType dtype = DType::kBf16;  // K/V storage type

  uint32_t group_size() const { return q_heads / kv_heads; }  // q heads per KV head
  // K and V bytes of one token over all layers and KV heads.
  uint64_t kv_bytes_per_token() const;
  friend bool operator==(const ModelShape&, const ModelShape&) = default;
};

// The Llama-3.1-8B attention shape used throughout the design's figures.
ModelShape llama31_8b_shape();

// Checks a shape against what kvtier supports; the message names the field,
// the value and the accepted range.
Status validate(const ModelShape& shape);

// "layers=32 q_heads=32 kv_heads=8 head_dim=128 dtype=bf16"
std::string to_string(const ModelShape& shape);

}  // namespace kvtier
