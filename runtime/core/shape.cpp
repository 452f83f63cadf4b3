#include "kvtier/core/shape.h"

#include <sstream>

namespace kvtier {

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBf16: return "bf16";
    case DType::kF16: return "f16";
    case DType::kF32: return "f32";
  }
  return "?";
}

Result<DType> parse_dtype(std::string_view text) {
  if (text == "bf16" || text == "bfloat16") return DType::kBf16;
  if (text == "f16" || text == "fp16" || text == "float16") return DType::kF16;
  if (text == "f32" || text == "fp32" || text == "float32") return DType::kF32;
  return invalid_argument("dtype '" + std::string(text) + "' is not one of bf16, f16, f32");
}

uint32_t dtype_bytes(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

uint64_t ModelShape::kv_bytes_per_token() const {
  return uint64_t{layers} * kv_heads * head_dim * 2 * dtype_bytes(dtype);
}

ModelShape llama31_8b_shape() { return ModelShape{32, 32, 8, 128, DType::kBf16}; }

namespace {

Status field_error(std::string_view field, uint64_t value, std::string_view rule) {
  return invalid_field("model shape", field, value, rule);
}

}  // namespace

Status validate(const ModelShape& s) {
  if (s.layers < 1 || s.layers > 1024) return field_error("layers", s.layers, "is outside 1..1024");
  if (s.q_heads < 1 || s.q_heads > 1024) return field_error("q_heads", s.q_heads, "is outside 1..1024");
  if (s.kv_heads < 1 || s.kv_heads > s.q_heads)
    return field_error("kv_heads", s.kv_heads, "is outside 1..q_heads (" + std::to_string(s.q_heads) + ")");
  if (s.q_heads % s.kv_heads != 0)
    return field_error("kv_heads", s.kv_heads,
                       "does not divide q_heads=" + std::to_string(s.q_heads) + " (GQA needs whole groups)");
  if (s.head_dim != 64 && s.head_dim != 128)
    return field_error("head_dim", s.head_dim, "is unsupported (supported: 64, 128)");
  if (s.dtype != DType::kBf16)
    return invalid_argument("model shape: dtype=" + std::string(dtype_name(s.dtype)) +
                            " is unsupported for K/V storage (supported: bf16)");
  return Status::ok_status();
}

std::string to_string(const ModelShape& s) {
  std::ostringstream os;
  os << "layers=" << s.layers << " q_heads=" << s.q_heads << " kv_heads=" << s.kv_heads
     << " head_dim=" << s.head_dim << " dtype=" << dtype_name(s.dtype);
  return os.str();
}

}  // namespace kvtier
