// CPU attention kernels (DESIGN.md section 3): summary building, summary
// scoring, top-k selection, exact attention over host-resident blocks and the
// far-field term. bf16 inputs, fp32 accumulation. Each kernel exists for
// AVX-512 (with AVX512_BF16 dot products where present), AVX2 and scalar; the
// ISA is chosen at run time (cpu_features(), capped by KVTIER_ISA) or passed
// explicitly so tests can force every path. No kernel allocates on its hot
// path or touches threads: cpu/engine.h parallelises over (KV head x block range).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvtier/core/aligned.h"
#include "kvtier/core/bf16.h"
#include "kvtier/core/policy.h"
#include "kvtier/core/tensor.h"
#include "kvtier/cpu/partial_state.h"

namespace kvtier::cpu {

enum class Isa : uint8_t { kScalar, kAvx2, kAvx512, kAvx512Bf16 };

std::string_view isa_name(Isa isa);
// Whether this CPU (and OS) can run kernels built for `isa`.
bool isa_available(Isa isa);
// The best ISA of cpu_features() (which KVTIER_ISA may cap).
Isa best_isa();

// How a block's summary is scored for one KV head against its group's q heads.
enum class ScoreRule : uint8_t {
  kMaxDot,    // max over the group's q heads g of scale * q_g . kmean_b (default, DESIGN.md section 10)
  kMinMaxBound,  // max over g of scale * sum_d max(q_gd * kmin_bd, q_gd * kmax_bd): an upper bound on q.k (needs kMinMaxF32)
};

// The summaries of one layer: per (KV head, block) the mean key (fp32, or
// bf16 for kMeanBf16), per-dimension key min/max (kMinMaxF32 only), the mean
// value (fp32, for the far-field term), and per block its token count.
// Rows are 64-byte aligned; row r = kv_head * blocks + block.
class SummaryTable {
 public:
  SummaryTable(uint32_t kv_heads, uint32_t blocks, uint32_t head_dim, SummaryKind kind);

  uint32_t kv_heads() const { return kv_heads_; }
  uint32_t blocks() const { return blocks_; }
  uint32_t head_dim() const { return head_dim_; }
  SummaryKind kind() const { return kind_; }

  float* kmean_f32(uint32_t h, uint32_t b);          // kMeanF32, kMinMaxF32
  const float* kmean_f32(uint32_t h, uint32_t b) const;
  bf16* kmean_bf16(uint32_t h, uint32_t b);           // kMeanBf16
  const bf16* kmean_bf16(uint32_t h, uint32_t b) const;
  float* kmin(uint32_t h, uint32_t b);                // kMinMaxF32
  const float* kmin(uint32_t h, uint32_t b) const;
  float* kmax(uint32_t h, uint32_t b);
  const float* kmax(uint32_t h, uint32_t b) const;
  float* vmean(uint32_t h, uint32_t b);
  const float* vmean(uint32_t h, uint32_t b) const;
  uint32_t& tokens(uint32_t b) { return tokens_[b]; }
  uint32_t tokens(uint32_t b) const { return tokens_[b]; }
  // Bytes the scorer reads per step (mean keys, plus min/max for kMinMaxF32).
  uint64_t scoring_bytes() const;
  // The mean keys as stored, for a copy elsewhere (the GPU scorer): fp32 rows
  // for kMeanF32 and kMinMaxF32, bf16 rows for kMeanBf16; row
  // r = h * blocks() + b starts kmean_row_stride() * r elements in.
  const void* kmean_rows() const;
  uint64_t kmean_row_stride() const;

 private:
  uint32_t kv_heads_, blocks_, head_dim_;
  SummaryKind kind_;
  uint64_t row_floats_;            // head_dim rounded up to 16 floats (64 bytes)
  std::vector<float, AlignedAllocator<float>> kmean_, kmin_, kmax_, vmean_;
  std::vector<bf16, AlignedAllocator<bf16>> kmean_bf16_;
  std::vector<uint32_t> tokens_;
};

// A block resident in host memory, laid out as stored: K [chunk_tokens][head_dim]
// then V [chunk_tokens][head_dim], bf16; the first `tokens` rows are valid.
struct HostBlock {
  const bf16* data = nullptr;
  uint32_t tokens = 0;
};

// Writes the summary of block b of KV head h from its stored layout.
void build_summary(Isa isa, HostBlock block, uint32_t chunk_tokens, SummaryTable& table, uint32_t h, uint32_t b);

// scores(h, b) for b in [block_begin, block_end): the rule's score of block b
// for KV head h, given q [q_heads][head_dim] bf16 (GQA: q head g belongs to KV
// head g / (q_heads / kv_heads)). scores is [kv_heads][blocks] fp32.
void score_summaries(Isa isa, Bf16View<2> q, const SummaryTable& table, float scale, ScoreRule rule,
                     uint32_t block_begin, uint32_t block_end, MutF32View<2> scores);

// The k highest-scoring blocks of KV head h among [far_begin, far_end)
// (the blocks that are neither sinks nor window), highest first; ties go to the
// lower block index. Fewer than k candidates: all of them. out is resized.
void select_topk(F32View<2> scores, uint32_t h, uint32_t k, uint32_t far_begin, uint32_t far_end,
                 std::vector<uint32_t>& out);

// Exact attention of q over blocks[h] for every KV head h (each block is read
// once for all q heads of its group), online softmax in fp32. out must be a
// state of q_heads x head_dim; every head is written (an empty list gives (0, -inf)).
void attend_blocks(Isa isa, Bf16View<2> q, std::span<const std::vector<HostBlock>> blocks, uint32_t chunk_tokens,
                   float scale, PartialState& out);

// The far-field partial over unselected blocks[h] of each KV head h: one
// pseudo-token per block with score scale * q . kmean_b + ln(tokens_b) and
// value vmean_b. out as for attend_blocks.
void far_field(Isa isa, Bf16View<2> q, const SummaryTable& table, std::span<const std::vector<uint32_t>> blocks,
               float scale, PartialState& out);

}  // namespace kvtier::cpu
