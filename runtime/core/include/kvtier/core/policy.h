// SparsityPolicy: which tokens each decode step attends (DESIGN.md section 2).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/core/status.h"

namespace kvtier {

// How a block is summarised for scoring against a query.
enum class SummaryKind : uint8_t {
  kMeanF32,    // mean key, fp32 (default)
  kMeanBf16,   // mean key, bf16
  kMinMaxF32,  // mean key plus per-dimension min/max of keys, fp32
};

// What unselected far blocks contribute.
enum class FarField : uint8_t {
  kNone,     // nothing
  kSummary,  // one pseudo-token per block: scale*q.kmean + ln(n), value vmean
};

std::string_view summary_kind_name(SummaryKind kind);
Result<SummaryKind> parse_summary_kind(std::string_view text);
std::string_view far_field_name(FarField far);
Result<FarField> parse_far_field(std::string_view text);

struct SparsityPolicy {
  uint64_t sink_tokens = 128;     // first tokens, always attended
  uint64_t window_tokens = 4096;  // most recent tokens, always attended
  uint32_t chunk_tokens = 64;     // tokens per block
  uint32_t topk_chunks = 64;      // selected far blocks per KV head per step
  // bf16 mean keys: half the bytes to score (the CPU's largest per-step read)
  // for top-k sets that keep 0.995 of their blocks against fp32 (kvtier bench
  // cpu); at 1M tokens on the H200 host, scoring 0.64 vs 0.96 ms per layer step.
  SummaryKind summary_kind = SummaryKind::kMeanBf16;
  FarField far_field = FarField::kNone;
  friend bool operator==(const SparsityPolicy&, const SparsityPolicy&) = default;
};

inline constexpr uint32_t kChunkTokensMin = 16;
inline constexpr uint32_t kChunkTokensMax = 256;

// Checks a policy; the message names the field, the value and the rule.
Status validate(const SparsityPolicy& policy);

// The chunk ranges a policy fixes for a context of `tokens` tokens: sinks
// [0, far_begin), far chunks [far_begin, far_end) (the top-k candidates),
// window [far_end, chunks). The tail chunk counts as a whole chunk; a window
// that does not start on a chunk boundary takes in the chunk it starts in.
// The planner, the simulator and the fidelity measures all use this one rule.
struct ChunkRanges {
  uint32_t chunks = 0;
  uint32_t far_begin = 0;
  uint32_t far_end = 0;
  uint32_t hot() const { return chunks - (far_end - far_begin); }  // sinks + window
};

// The ranges of `policy` (valid: see validate()) at `tokens` tokens.
ChunkRanges chunk_ranges(const SparsityPolicy& policy, uint64_t tokens);

// "sink_tokens=128 window_tokens=4096 chunk_tokens=64 topk_chunks=64 summary=mean_f32 far_field=none"
std::string to_string(const SparsityPolicy& policy);

}  // namespace kvtier
