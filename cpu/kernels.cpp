// Argument checks and run-time ISA dispatch for the CPU kernels of
// kernels.h; the kernels themselves live under x86/, one file per ISA, and
// work on one KV head at a time (x86/kernels_isa.h).
#include "kvtier/cpu/kernels.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>

#include "kvtier/core/assert.h"
#include "kvtier/cpu/cpu_features.h"
#include "x86/kernels_isa.h"

namespace kvtier::cpu {
namespace {

// The entry points of one ISA.
struct IsaKernels {
  decltype(&isa::scalar::build_summary) build_summary;
  decltype(&isa::scalar::score_summaries) score_summaries;
  decltype(&isa::scalar::attend_blocks) attend_blocks;
  decltype(&isa::scalar::far_field) far_field;
};

// Indexed by Isa.
constexpr IsaKernels kKernels[] = {
    {&isa::scalar::build_summary, &isa::scalar::score_summaries, &isa::scalar::attend_blocks,
     &isa::scalar::far_field},
    {&isa::avx2::build_summary, &isa::avx2::score_summaries, &isa::avx2::attend_blocks, &isa::avx2::far_field},
    {&isa::avx512::build_summary, &isa::avx512::score_summaries, &isa::avx512::attend_blocks,
     &isa::avx512::far_field},
    {&isa::avx512bf16::build_summary, &isa::avx512bf16::score_summaries, &isa::avx512bf16::attend_blocks,
     &isa::avx512bf16::far_field},
};

// The kernels of `isa` for rows of head_dim elements, failing loudly on an
// ISA this CPU lacks or a head_dim the kernels do not handle.
const IsaKernels& kernels_for(Isa isa, uint64_t head_dim) {
  KVT_ASSERT(isa_available(isa), "ISA ", isa_name(isa), " is not available on this CPU (best: ",
             isa_name(best_isa()), ")");
  KVT_ASSERT(head_dim > 0 && head_dim <= isa::kHeadDimMax, "head_dim=", head_dim, ", supported 1 to ",
             isa::kHeadDimMax);
  // SIMD rows are whole 16-lane vectors; every common head dim (64, 80, 96, 128, 256) is one.
  KVT_ASSERT(isa == Isa::kScalar || head_dim % 16 == 0, "head_dim=", head_dim, ": the ", isa_name(isa),
             " kernels need a multiple of 16");
  return kKernels[static_cast<size_t>(isa)];
}

uint32_t group_size(uint64_t q_heads, uint64_t kv_heads) {
  KVT_ASSERT(kv_heads >= 1 && q_heads >= kv_heads && q_heads % kv_heads == 0, "q_heads=", q_heads,
             " kv_heads=", kv_heads);
  return static_cast<uint32_t>(q_heads / kv_heads);
}

void check_chunk_tokens(uint32_t chunk_tokens) {
  KVT_ASSERT(chunk_tokens >= 1 && chunk_tokens <= kChunkTokensMax, "chunk_tokens=", chunk_tokens, ", supported 1 to ",
             kChunkTokensMax);
}

void check_state(const PartialState& out, uint64_t q_heads, uint64_t head_dim) {
  KVT_ASSERT(out.heads == q_heads && out.head_dim == head_dim && out.o.size() == q_heads * head_dim &&
                 out.lse.size() == q_heads,
             "out state ", out.heads, "x", out.head_dim, " (o ", out.o.size(), ", lse ", out.lse.size(), ") for q ",
             q_heads, "x", head_dim);
}

// ln(n) for the token count n of a block, ln(0) = -inf: the far-field bias,
// looked up so that every ISA adds the same value and no kernel calls log per block.
const float* ln_tokens() {
  static const std::array<float, kChunkTokensMax + 1> table = [] {
    std::array<float, kChunkTokensMax + 1> t{};
    t[0] = -std::numeric_limits<float>::infinity();
    for (uint32_t n = 1; n <= kChunkTokensMax; ++n) t[n] = static_cast<float>(std::log(static_cast<double>(n)));
    return t;
  }();
  return table.data();
}

// Head h's rows of the table (null arrays when the table has no blocks).
isa::SummaryRows rows_of(const SummaryTable& table, uint32_t h) {
  isa::SummaryRows rows{};
  rows.stride_f32 = isa::f32_row_stride(table.head_dim());
  rows.stride_bf16 = isa::bf16_row_stride(table.head_dim());
  rows.ln_tokens = ln_tokens();
  if (table.blocks() == 0) return rows;
  const SummaryKind kind = table.kind();
  if (kind == SummaryKind::kMeanBf16) rows.kmean_bf16 = table.kmean_bf16(h, 0);
  else rows.kmean = table.kmean_f32(h, 0);
  if (kind == SummaryKind::kMinMaxF32) {
    rows.kmin = table.kmin(h, 0);
    rows.kmax = table.kmax(h, 0);
  }
  rows.vmean = table.vmean(h, 0);
  // The const accessor returns tokens by value; the kernels only read the array.
  rows.tokens = &const_cast<SummaryTable&>(table).tokens(0);
  return rows;
}

// The q rows of KV head h's group.
isa::QGroup group_of(Bf16View<2> q, uint32_t h, uint32_t group) {
  const uint32_t dim = static_cast<uint32_t>(q.extent(1));
  return {q.data().data() + uint64_t{h} * group * dim, group, dim};
}

// Orders candidate blocks: higher score first, then lower index; NaN ranks
// last. Each block maps to a 64-bit rank -- its score as an integer that
// orders like the float (NaN lowest, -0 as +0) above its inverted index -- so
// one integer comparison decides, where the float rules need several branches.
struct RanksHigher {
  const float* scores;
  static uint32_t order_key(float x) {
    if (std::isnan(x)) return 0;
    const uint32_t u = std::bit_cast<uint32_t>(x == 0 ? 0.f : x);
    return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
  }
  uint64_t rank(uint32_t b) const { return uint64_t{order_key(scores[b])} << 32 | ~b; }
  bool operator()(uint32_t a, uint32_t b) const { return rank(a) > rank(b); }
};

}  // namespace

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

// The AVX2 file is also built with -mf16c and the AVX-512 files with -mavx512dq:
// every CPU with AVX2 has F16C, and every one with AVX-512BW/VL has DQ.
bool isa_available(Isa isa) {
  const CpuFeatures& f = cpu_features();
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl;
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return f.avx2 && f.fma;
    case Isa::kAvx512: return avx512;
    case Isa::kAvx512Bf16: return avx512 && f.avx512_bf16;
  }
  return false;
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2})
    if (isa_available(isa)) return isa;
  return Isa::kScalar;
}

void build_summary(Isa isa, HostBlock block, uint32_t chunk_tokens, SummaryTable& table, uint32_t h, uint32_t b) {
  const uint32_t dim = table.head_dim();
  const IsaKernels& kernels = kernels_for(isa, dim);
  check_chunk_tokens(chunk_tokens);
  KVT_ASSERT(block.tokens <= chunk_tokens && (block.tokens == 0 || block.data != nullptr), "block of ",
             block.tokens, " tokens (data ", block.data, ") in chunks of ", chunk_tokens);
  const SummaryKind kind = table.kind();
  // A bf16 table gets the fp32 mean rounded to nearest even, like any bf16.
  alignas(64) float mean[isa::kHeadDimMax];
  const isa::SummaryOut out{kind == SummaryKind::kMeanBf16 ? mean : table.kmean_f32(h, b),
                            kind == SummaryKind::kMinMaxF32 ? table.kmin(h, b) : nullptr,
                            kind == SummaryKind::kMinMaxF32 ? table.kmax(h, b) : nullptr, table.vmean(h, b)};
  if (block.tokens == 0) {  // no keys: a zero summary, and tokens 0 keeps it out of the far field
    for (float* row : {out.kmean, out.kmin, out.kmax, out.vmean})
      if (row != nullptr) std::fill_n(row, dim, 0.f);
  } else {
    kernels.build_summary(block.data, block.data + uint64_t{chunk_tokens} * dim, block.tokens, dim, out);
  }
  if (kind == SummaryKind::kMeanBf16)
    std::transform(mean, mean + dim, table.kmean_bf16(h, b), [](float x) { return bf16::from_float(x); });
  table.tokens(b) = block.tokens;
}

void score_summaries(Isa isa, Bf16View<2> q, const SummaryTable& table, float scale, ScoreRule rule,
                     uint32_t block_begin, uint32_t block_end, MutF32View<2> scores) {
  const IsaKernels& kernels = kernels_for(isa, q.extent(1));
  KVT_ASSERT_EQ(q.extent(1), uint64_t{table.head_dim()});
  const uint32_t group = group_size(q.extent(0), table.kv_heads());
  KVT_ASSERT(scores.extent(0) == table.kv_heads() && scores.extent(1) == table.blocks(), "scores ",
             scores.extent(0), "x", scores.extent(1), " for ", table.kv_heads(), "x", table.blocks());
  KVT_ASSERT(block_begin <= block_end && block_end <= table.blocks(), "blocks [", block_begin, ", ", block_end,
             ") of ", table.blocks());
  KVT_ASSERT(rule != ScoreRule::kMinMaxBound || table.kind() == SummaryKind::kMinMaxF32,
             "the min/max bound needs a min_max_f32 table, not ", summary_kind_name(table.kind()));
  if (block_begin == block_end) return;
  for (uint32_t h = 0; h < table.kv_heads(); ++h)
    kernels.score_summaries(group_of(q, h, group), rows_of(table, h), scale, rule, block_begin, block_end,
                            scores.data().data() + uint64_t{h} * table.blocks());
}

namespace {

// The top k of s[far_begin, far_end) in one streaming pass (select_topk's
// path for short ranges, and where the bound below leaves fewer than k).
void select_topk_streaming(const float* s, uint32_t k, uint32_t far_begin, uint32_t far_end,
                           std::vector<uint32_t>& out) {
  const RanksHigher higher{s};
  // `out` collects candidates, unordered, up to 2k of them (a caller that
  // reuses it allocates nothing); when full, the best k stay and the k-th
  // best's score becomes the threshold a block must reach to be collected.
  // Almost every block fails that on one float comparison, checked 16 at a
  // time, so the pass is O(n) plus O(k) per flush, and flushes are few unless
  // the scores ascend. NaN passes the test (!(x < t)) and is ranked exactly.
  out.clear();
  if (k == 0) return;
  auto keep_best = [&] {
    if (out.size() <= k) return;
    std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), higher);
    out.resize(k);
  };
  float threshold = -std::numeric_limits<float>::infinity();
  auto collect = [&](uint32_t b) {
    out.push_back(b);
    if (out.size() < 2 * uint64_t{k}) return;
    keep_best();
    const float kth = s[out[k - 1]];
    threshold = std::isnan(kth) ? -std::numeric_limits<float>::infinity() : kth;
  };
  constexpr uint32_t kChunk = 16;
  uint32_t b = far_begin;
  for (; b + kChunk <= far_end; b += kChunk) {
    const float* chunk = s + b;
    uint32_t passing = 0;
    for (uint32_t i = 0; i < kChunk; ++i) passing += !(chunk[i] < threshold);
    if (passing == 0) continue;
    for (uint32_t i = 0; i < kChunk; ++i)
      if (!(chunk[i] < threshold)) collect(b + i);
  }
  for (; b < far_end; ++b)
    if (!(s[b] < threshold)) collect(b);
  keep_best();
  std::sort(out.begin(), out.end(), higher);
}

}  // namespace

void select_topk(F32View<2> scores, uint32_t h, uint32_t k, uint32_t far_begin, uint32_t far_end,
                 std::vector<uint32_t>& out) {
  KVT_ASSERT(h < scores.extent(0), "KV head ", h, " of ", scores.extent(0));
  KVT_ASSERT(far_begin <= far_end && far_end <= scores.extent(1), "far blocks [", far_begin, ", ", far_end, ") of ",
             scores.extent(1));
  const float* s = scores.data().data() + uint64_t{h} * scores.extent(1);
  const uint32_t n = far_end - far_begin;
  constexpr uint32_t kChunk = 16;
  const uint32_t chunks = n / kChunk;
  if (k == 0 || chunks < 4 * uint64_t{k}) return select_topk_streaming(s, k, far_begin, far_end, out);
  // A bound first: the k-th largest of the chunks' maxima. k chunks reach
  // it, so at least k blocks score at least that much, and so does every
  // block of the top k (NaN compares below everything: a chunk of NaNs has
  // max -inf). Only chunks whose maximum reaches the bound are scanned, and
  // the few blocks there that reach it are ranked exactly as the streaming
  // pass ranks (RanksHigher), so the result is the same.
  thread_local std::vector<float> maxima, ranked;
  maxima.resize(chunks);
  for (uint32_t c = 0; c < chunks; ++c) {
    const float* x = s + far_begin + size_t{c} * kChunk;
    float m0 = -std::numeric_limits<float>::infinity(), m1 = m0, m2 = m0, m3 = m0;
    for (uint32_t i = 0; i < kChunk; i += 4) {
      m0 = m0 < x[i] ? x[i] : m0;
      m1 = m1 < x[i + 1] ? x[i + 1] : m1;
      m2 = m2 < x[i + 2] ? x[i + 2] : m2;
      m3 = m3 < x[i + 3] ? x[i + 3] : m3;
    }
    maxima[c] = std::max(std::max(m0, m1), std::max(m2, m3));
  }
  ranked.assign(maxima.begin(), maxima.end());
  std::nth_element(ranked.begin(), ranked.begin() + (k - 1), ranked.end(), std::greater<float>());
  const float bound = ranked[k - 1];
  out.clear();
  for (uint32_t c = 0; c < chunks; ++c) {
    if (maxima[c] < bound) continue;
    const uint32_t b0 = far_begin + c * kChunk;
    for (uint32_t i = 0; i < kChunk; ++i)
      if (s[b0 + i] >= bound) out.push_back(b0 + i);
  }
  for (uint32_t b = far_begin + chunks * kChunk; b < far_end; ++b)  // the tail past the last whole chunk
    if (s[b] >= bound) out.push_back(b);
  if (out.size() < k) return select_topk_streaming(s, k, far_begin, far_end, out);  // -inf bound: NaNs needed
  const RanksHigher higher{s};
  std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), higher);
  out.resize(k);
  std::sort(out.begin(), out.end(), higher);
}

void attend_blocks(Isa isa, Bf16View<2> q, std::span<const std::vector<HostBlock>> blocks, uint32_t chunk_tokens,
                   float scale, PartialState& out) {
  const uint64_t dim = q.extent(1);
  const IsaKernels& kernels = kernels_for(isa, dim);
  const uint32_t group = group_size(q.extent(0), blocks.size());
  check_chunk_tokens(chunk_tokens);
  check_state(out, q.extent(0), dim);
  for (const std::vector<HostBlock>& list : blocks)
    for (const HostBlock& b : list)
      KVT_ASSERT(b.tokens <= chunk_tokens && (b.tokens == 0 || b.data != nullptr), "block of ", b.tokens,
                 " tokens (data ", b.data, ") in chunks of ", chunk_tokens);
  for (uint32_t h = 0; h < blocks.size(); ++h)
    kernels.attend_blocks(group_of(q, h, group), blocks[h].data(), blocks[h].size(), chunk_tokens, scale,
                          out.o.data() + uint64_t{h} * group * dim, out.lse.data() + uint64_t{h} * group);
}

void far_field(Isa isa, Bf16View<2> q, const SummaryTable& table, std::span<const std::vector<uint32_t>> blocks,
               float scale, PartialState& out) {
  const uint64_t dim = q.extent(1);
  const IsaKernels& kernels = kernels_for(isa, dim);
  KVT_ASSERT_EQ(dim, uint64_t{table.head_dim()});
  KVT_ASSERT_EQ(blocks.size(), size_t{table.kv_heads()});
  const uint32_t group = group_size(q.extent(0), table.kv_heads());
  check_state(out, q.extent(0), dim);
  for (const std::vector<uint32_t>& list : blocks)
    for (uint32_t b : list)
      KVT_ASSERT(b < table.blocks() && table.tokens(b) <= kChunkTokensMax, "far block ", b, " of ", table.blocks(),
                 " (", b < table.blocks() ? table.tokens(b) : 0, " tokens)");
  for (uint32_t h = 0; h < table.kv_heads(); ++h)
    kernels.far_field(group_of(q, h, group), rows_of(table, h), blocks[h].data(), blocks[h].size(), scale,
                      out.o.data() + uint64_t{h} * group * dim, out.lse.data() + uint64_t{h} * group);
}

}  // namespace kvtier::cpu
