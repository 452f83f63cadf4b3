// A synthetic attention-only model: q, k and v for every layer from fixed
// random projections of a latent process, so that any shape and any context
// length can be driven without weights. Used by tests, benchmarks and the
// fidelity check (DESIGN.md section 8) to produce K/V and queries whose
// structure resembles a real model's where it matters to kvtier:
//
// - Keys are locally correlated along the context. The latent of context token
//   t is a truncated exponential moving sum of counter-based noise,
//     x_t = c * sum_{i<W} a^i xi_{t-i},   a = key_correlation,
//   with c chosen so that x_t has unit variance per dimension and W the
//   smallest window with a^W <= 1e-3 (key_filter_taps()). Its autocorrelation
//   at lag d is a^d (to 1e-6, zero from lag W on): an e-folding length of
//   -1/ln(a) tokens (19.5 at the default 0.95), so a 64-token block has
//   structure and its mean key carries about 40% of a key's variance. That is
//   what makes mean-key summaries informative. Because xi_t is a pure function
//   of (seed, t), K/V of any token range is regenerated bit for bit without
//   generating earlier tokens, in O(W * hidden + hidden * kv_heads * head_dim)
//   per token.
// - The latent is shared by all layers (a stand-in for the residual stream);
//   each layer has its own projections Wq, Wk, Wv (Gaussian, 1/sqrt(hidden)):
//   k = Wk x, v = Wv x have unit variance per element, q = logit_std * Wq x,
//   so that with the softmax scale 1/sqrt(head_dim) the logit of an unrelated
//   (q, k) pair has standard deviation logit_std. At the default 3 and 64K
//   tokens (head_dim 64, hidden 128) a head's largest softmax weight averages
//   ~0.03 (2000x uniform), the best 64 of 1024 blocks hold ~70% of the mass
//   and mean-key top-64 selection captures ~45% (logit_std 2: 0.006, 43%,
//   28%; 4: 0.09, 88%, 59%): neither uniform nor one-hot. There is no
//   sink or recency bias, so captured-mass figures are pessimistic next to a
//   real model's, where sinks and the window hold much of the mass.
// - Decode queries come from their own latent y_s over decode steps, an exact
//   AR(1): y_0 = eta_0, y_s = rho y_{s-1} + sqrt(1 - rho^2) eta_s with
//   rho = query_correlation, so each q element has lag-1 correlation rho.
//   rho = 0 gives independent queries (the adversarial case for a scheduler
//   that prefetches what the last step selected); real decoding is closer to
//   0.9 and above. The trajectory is cached (hidden floats per step reached).
// - Needles: needle i plants a unit direction u_i (per layer and KV head) in
//   the keys of its tokens (component of norm key_norm * sqrt(head_dim)); a
//   decode query that asks for it has its own u_i component replaced by one
//   that gives every needle token `strength` extra logits. The needle's block
//   should then be the top-scoring far block at that step.
//
// The per-token noise is a sum of four 16-bit uniforms (Irwin-Hall, unit
// variance): cheap, and every key or query element is a sum over `hidden`
// latent dimensions, so they are Gaussian to the eye. Projections use
// Box-Muller normals. Outputs are bf16, rounded to nearest even.
//
// Speed: K and V of Llama-3.1-8B's shape at hidden 256 come at about 12K
// tokens/s per layer on one core (the projections, ~1 MFLOP per token); a
// 1M-token, 32-layer context is ~45 core-minutes, so drive big contexts from
// several threads (per layer or per token range) or with a smaller hidden.
//
// All methods are const and thread-safe. A layer's projections (about
// (q_heads + 2 kv_heads) * head_dim * hidden floats: 6 MiB for Llama-3.1-8B's
// shape at hidden 256) are generated on the layer's first use.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "kvtier/core/bf16.h"
#include "kvtier/core/shape.h"
#include "kvtier/core/status.h"

namespace kvtier::runtime {

// A block of context tokens whose keys a later query looks for.
struct Needle {
  double depth = 0.5;                    // first token at depth * (context_tokens - tokens), rounded
  std::optional<uint64_t> first_token;   // overrides depth when set
  uint32_t tokens = 64;                  // planted tokens, 1..4096
  // Extra logit (after the softmax scale) of a needle token for its query. At
  // the default 32 and logit_std 3, a 64-token needle's block ranks in the top
  // three of 1024 by mean-key score, first in ~95% of cases (measured over 60
  // seeds by tests/runtime/synthetic_model_test.cpp).
  float strength = 32.f;
  float key_norm = 2.f;  // planted key component's norm, in units of a typical key's norm sqrt(head_dim)
  std::optional<uint64_t> query_step;    // decode step whose query asks for the needle; unset: every step
};

struct SyntheticModelOptions {
  ModelShape shape;                 // q/k/v geometry; K/V are produced in bf16
  uint64_t context_tokens = 0;      // prefilled tokens; decode step s is position context_tokens + s
  uint64_t seed = 1;
  uint32_t hidden = 256;            // latent dimensions, 1..4096
  double query_correlation = 0.9;   // rho, lag-1 correlation of decode queries over steps, [0, 1]
  double key_correlation = 0.95;    // lag-1 correlation of the context latent over tokens, [0, 0.995]
  double logit_std = 3.0;           // std of scale * q.k for unrelated q, k, (0, 64]
  std::vector<Needle> needles;
};

// Where a needle sits for a given block size. A needle that straddles a block
// boundary has tokens in first_block..last_block; `block` holds most of them
// (the earlier block on a tie).
struct NeedlePlacement {
  uint64_t first_token = 0;
  uint32_t tokens = 0;
  uint32_t first_block = 0;
  uint32_t last_block = 0;
  uint32_t block = 0;
};

class SyntheticModel {
 public:
  // Checks the options; the message names the offending field and its range.
  static Result<SyntheticModel> create(SyntheticModelOptions options);

  SyntheticModel(SyntheticModel&&) noexcept;
  SyntheticModel& operator=(SyntheticModel&&) noexcept;
  ~SyntheticModel();

  const SyntheticModelOptions& options() const;
  const ModelShape& shape() const;
  // W: noise terms summed per context latent (1 when key_correlation is 0).
  uint32_t key_filter_taps() const;
  // 1/sqrt(head_dim), the scale logit_std and needle strengths refer to.
  double softmax_scale() const;

  // Keys and values of tokens [first_token, first_token + n) of `layer`:
  // k_out and v_out are [n][kv_heads][head_dim] bf16. Any range, inside the
  // context or past it (tokens appended while decoding), gives the same values
  // as the matching slice of a longer range.
  void kv(uint32_t layer, uint64_t first_token, uint64_t n, std::span<bf16> k_out, std::span<bf16> v_out) const;
  // Keys only, as kv() (half the work).
  void keys(uint32_t layer, uint64_t first_token, uint64_t n, std::span<bf16> k_out) const;
  // Prefill queries of tokens [first_token, first_token + n): [n][q_heads][head_dim]
  // bf16, from the same latent as the tokens' keys.
  void prefill_query(uint32_t layer, uint64_t first_token, uint64_t n, std::span<bf16> q_out) const;
  // The query of decode step `step` (position context_tokens + step):
  // [q_heads][head_dim] bf16, including the needles that ask at this step.
  void decode_query(uint32_t layer, uint64_t step, std::span<bf16> q_out) const;

  // Placement of each needle, in options().needles order, for blocks of chunk_tokens.
  std::vector<NeedlePlacement> needle_placements(uint32_t chunk_tokens) const;
  // The block index holding (most of) each needle.
  std::vector<uint32_t> needle_blocks(uint32_t chunk_tokens) const;

 private:
  struct State;
  explicit SyntheticModel(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace kvtier::runtime
