// Fidelity of sparse attention (DESIGN.md section 8): how far one sparse
// decode step, for one layer, is from dense attention over every tier.
//
// measure_fidelity() computes the dense fp64 reference itself, which reads
// every token of the context: it is O(context) per step and meant for sampled
// steps and layers (`--verify-every N`), not for every step. The sparse output
// it judges is whatever the kernels produced, merged over devices and tiers.
//
// needle_recall() and depths() are the bookkeeping of a needle sweep over
// depths 0-100% of the context.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvtier/core/policy.h"
#include "kvtier/core/status.h"
#include "kvtier/core/tensor.h"
#include "kvtier/cpu/partial_state.h"
#include "kvtier/cpu/reference.h"

namespace kvtier::cpu {

// Chunk ranges of a policy: kvtier::chunk_ranges (kvtier/core/policy.h).

// What one sparse step attended, per KV head.
struct AttendedSet {
  // [kv_heads] chunks attended exactly: sinks, window and the selected far
  // chunks, each once, in any order.
  std::vector<std::vector<uint32_t>> chunks;
  // [kv_heads] chunks that contributed one summary pseudo-token each
  // (far_field = summary), disjoint from `chunks`; empty when the policy has
  // no far field. Their share of the mass is not counted as recalled: the
  // far field's approximation shows in rel_error.
  std::vector<std::vector<uint32_t>> far_field;
};

// The set of a step under `policy` at `tokens` tokens that selected
// selected[h] (far chunks only) for KV head h: sinks, window and selected in
// ascending order, plus the unselected far chunks as far field when
// policy.far_field is kSummary. Errors name a selected chunk that is not a
// far chunk or is listed twice.
Result<AttendedSet> attended_set(const SparsityPolicy& policy, uint64_t tokens,
                                 std::span<const std::vector<uint32_t>> selected);

struct FidelityReport {
  // ||o_sparse - o_dense||_2 / ||o_dense||_2 over all q heads and dims, fp64.
  double rel_error = 0;
  // Share of the true (dense, fp64) softmax mass that falls on tokens of the
  // exactly attended chunks: the minimum and mean over q heads, and per q head.
  double mass_recall_min = 0;
  double mass_recall_mean = 0;
  std::vector<double> mass_recall;  // [q_heads]
};

// Compares sparse_output (the kernels' state, fp32, [q_heads][head_dim]) with
// dense fp64 attention of q [q_heads][head_dim] bf16 over every token of kv.
// attended_chunks[kv_head] lists the chunks (of chunk_tokens tokens; the last
// may be partial) that head attended exactly. GQA: q head g reads KV head
// g / (q_heads / kv_heads). Errors name the shape, chunk or value that is wrong.
Result<FidelityReport> measure_fidelity(Bf16View<2> q, const ref::LayerKv& kv,
                                        std::span<const std::vector<uint32_t>> attended_chunks,
                                        uint32_t chunk_tokens, const PartialState& sparse_output, double scale);

// As above for an AttendedSet; also checks that its far-field lists are in
// range and disjoint from the exact chunks.
Result<FidelityReport> measure_fidelity(Bf16View<2> q, const ref::LayerKv& kv, const AttendedSet& attended,
                                        uint32_t chunk_tokens, const PartialState& sparse_output, double scale);

// One needle trial: the chunk holding the needle and what each KV head selected.
struct NeedleTrial {
  uint32_t needle_chunk = 0;
  std::vector<std::vector<uint32_t>> selected;  // [kv_heads] chunk indices
};

// The fraction of (trial, KV head) pairs whose selection contains the
// trial's needle chunk; 0 when there are no pairs.
double needle_recall(std::span<const NeedleTrial> trials);

// n depths evenly spaced in [0, 1], both ends included (as numpy's
// linspace(0, 1, n)): n = 1 gives {0}, n = 0 gives none.
std::vector<double> depths(uint32_t n);

// The token at `depth` (0 = first, 1 = last) of a context of `tokens` tokens
// (> 0), rounded to the nearest token.
uint64_t depth_token(double depth, uint64_t tokens);

}  // namespace kvtier::cpu
