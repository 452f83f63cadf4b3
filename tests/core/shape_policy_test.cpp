#include <doctest/doctest.h>

#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"

using namespace kvtier;

namespace {

std::string error_of(const Status& s) { return s.ok() ? "ok" : s.message(); }

}  // namespace

TEST_CASE("the Llama-3.1-8B shape is valid and its KV costs 128 KiB per token") {
  const ModelShape s = llama31_8b_shape();
  CHECK(validate(s).ok());
  CHECK(s.group_size() == 4);
  CHECK(s.kv_bytes_per_token() == 128 * 1024);
}

TEST_CASE("invalid shapes name the field and the rule") {
  ModelShape s = llama31_8b_shape();
  s.kv_heads = 5;
  CHECK(error_of(validate(s)) == "model shape: kv_heads=5 does not divide q_heads=32 (GQA needs whole groups)");
  s.kv_heads = 64;
  CHECK(error_of(validate(s)).find("kv_heads=64 is outside 1..q_heads (32)") != std::string::npos);
  s = llama31_8b_shape();
  s.head_dim = 96;
  CHECK(error_of(validate(s)) == "model shape: head_dim=96 is unsupported (supported: 64, 128)");
  s = llama31_8b_shape();
  s.layers = 0;
  CHECK(error_of(validate(s)).find("layers=0") != std::string::npos);
  s = llama31_8b_shape();
  s.dtype = DType::kF16;
  CHECK(error_of(validate(s)).find("dtype=f16 is unsupported") != std::string::npos);
  CHECK(error_of(parse_dtype("int4").status()) == "dtype 'int4' is not one of bf16, f16, f32");
}

TEST_CASE("the default policy is valid") {
  const SparsityPolicy p;
  CHECK(validate(p).ok());
  CHECK(to_string(p) ==
        "sink_tokens=128 window_tokens=4096 chunk_tokens=64 topk_chunks=64 summary=mean_bf16 far_field=none");
}

TEST_CASE("invalid policies name the field and the rule") {
  SparsityPolicy p;
  for (uint32_t bad : {0u, 8u, 48u, 512u}) {
    p.chunk_tokens = bad;
    CHECK(error_of(validate(p)) ==
          "sparsity policy: chunk_tokens=" + std::to_string(bad) + " must be a power of two in 16..256");
  }
  for (uint32_t good : {16u, 32u, 64u, 128u}) {
    p.chunk_tokens = good;
    CHECK(validate(p).ok());
  }
  p = SparsityPolicy{};
  p.sink_tokens = 100;
  CHECK(error_of(validate(p)) == "sparsity policy: sink_tokens=100 must be a multiple of chunk_tokens=64");
  p = SparsityPolicy{};
  p.window_tokens = 4000;
  CHECK(error_of(validate(p)) == "sparsity policy: window_tokens=4000 must be a multiple of chunk_tokens=64");
  p.window_tokens = 0;
  CHECK(error_of(validate(p)).find("window_tokens=0 must be at least chunk_tokens") != std::string::npos);
  CHECK(error_of(parse_summary_kind("int3").status()).find("summary_kind 'int3'") != std::string::npos);
  CHECK(*parse_far_field("summary") == FarField::kSummary);
  CHECK(error_of(parse_far_field("all").status()) == "far_field 'all' is not one of none, summary");
}

TEST_CASE("chunk ranges: sinks round up, the window takes in the chunk it starts in, the tail is a chunk") {
  const SparsityPolicy p;  // 128 sink tokens, 4096 window tokens, 64-token chunks
  const ChunkRanges m = chunk_ranges(p, uint64_t{1} << 20);
  CHECK(m.chunks == 16384);
  CHECK(m.far_begin == 2);
  CHECK(m.far_end == 16320);
  CHECK(m.hot() == 66);
  // 5000 tokens: 79 chunks (the last holds 8 tokens); the window starts at token 904, in chunk 14.
  const ChunkRanges odd = chunk_ranges(p, 5000);
  CHECK(odd.chunks == 79);
  CHECK(odd.far_begin == 2);
  CHECK(odd.far_end == 14);
  // Shorter than sinks + window: nothing is far.
  const ChunkRanges small = chunk_ranges(p, 100);
  CHECK(small.chunks == 2);
  CHECK(small.far_begin == 2);
  CHECK(small.far_end == 2);
  CHECK(small.hot() == 2);
}
