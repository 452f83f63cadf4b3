#include "kvtier/core/policy.h"

#include <bit>
#include <sstream>

namespace kvtier {

std::string_view summary_kind_name(SummaryKind kind) {
  switch (kind) {
    case SummaryKind::kMeanF32: return "mean_f32";
    case SummaryKind::kMeanBf16: return "mean_bf16";
    case SummaryKind::kMinMaxF32: return "minmax_f32";
  }
  return "?";
}

Result<SummaryKind> parse_summary_kind(std::string_view text) {
  for (SummaryKind k : {SummaryKind::kMeanF32, SummaryKind::kMeanBf16, SummaryKind::kMinMaxF32})
    if (text == summary_kind_name(k)) return k;
  return invalid_argument("summary_kind '" + std::string(text) +
                          "' is not one of mean_f32, mean_bf16, minmax_f32");
}

std::string_view far_field_name(FarField far) { return far == FarField::kNone ? "none" : "summary"; }

Result<FarField> parse_far_field(std::string_view text) {
  if (text == "none") return FarField::kNone;
  if (text == "summary") return FarField::kSummary;
  return invalid_argument("far_field '" + std::string(text) + "' is not one of none, summary");
}

namespace {

Status field_error(std::string_view field, uint64_t value, std::string_view rule) {
  return invalid_field("sparsity policy", field, value, rule);
}

}  // namespace

Status validate(const SparsityPolicy& p) {
  const uint32_t c = p.chunk_tokens;
  if (c < kChunkTokensMin || c > kChunkTokensMax || !std::has_single_bit(c))
    return field_error("chunk_tokens", c, "must be a power of two in 16..256");
  const std::string multiple = "must be a multiple of chunk_tokens=" + std::to_string(c);
  if (p.sink_tokens % c != 0) return field_error("sink_tokens", p.sink_tokens, multiple);
  if (p.window_tokens % c != 0) return field_error("window_tokens", p.window_tokens, multiple);
  // The window always holds the block being appended to, so it is never empty.
  if (p.window_tokens == 0) return field_error("window_tokens", 0, "must be at least chunk_tokens");
  constexpr uint64_t kMaxTokens = uint64_t{1} << 32;
  if (p.sink_tokens > kMaxTokens) return field_error("sink_tokens", p.sink_tokens, "exceeds 4G tokens");
  if (p.window_tokens > kMaxTokens) return field_error("window_tokens", p.window_tokens, "exceeds 4G tokens");
  if (p.topk_chunks > (uint32_t{1} << 20))
    return field_error("topk_chunks", p.topk_chunks, "exceeds 1048576 blocks per KV head");
  return Status::ok_status();
}

std::string to_string(const SparsityPolicy& p) {
  std::ostringstream os;
  os << "sink_tokens=" << p.sink_tokens << " window_tokens=" << p.window_tokens
     << " chunk_tokens=" << p.chunk_tokens << " topk_chunks=" << p.topk_chunks
     << " summary=" << summary_kind_name(p.summary_kind) << " far_field=" << far_field_name(p.far_field);
  return os.str();
}

ChunkRanges chunk_ranges(const SparsityPolicy& policy, uint64_t tokens) {
  KVT_ASSERT(policy.chunk_tokens > 0, "chunk_ranges with chunk_tokens=0");
  const uint64_t c = policy.chunk_tokens;
  ChunkRanges r;
  r.chunks = static_cast<uint32_t>((tokens + c - 1) / c);
  const uint64_t sink_chunks = (policy.sink_tokens + c - 1) / c;
  const uint64_t window_start = tokens > policy.window_tokens ? (tokens - policy.window_tokens) / c : 0;
  r.far_begin = static_cast<uint32_t>(std::min<uint64_t>(sink_chunks, r.chunks));
  r.far_end = static_cast<uint32_t>(std::max<uint64_t>(window_start, r.far_begin));
  return r;
}

}  // namespace kvtier
