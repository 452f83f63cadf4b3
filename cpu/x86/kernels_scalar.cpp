// Scalar kernels: plain C++ for any CPU, and the readable statement of what
// the SIMD paths compute. Same blocking as the SIMD bodies (passes of at most
// kGroupMax heads, online softmax over one block or tile at a time, fp32
// throughout) but dot products summed in index order and std::exp.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels_isa.h"

namespace kvtier::cpu::isa::scalar {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

float widen(float x) { return x; }
float widen(bf16 x) { return x.to_float(); }

template <class T>
float dot(const float* q, const T* k, uint32_t dim) {
  float sum = 0;
  for (uint32_t d = 0; d < dim; ++d) sum += q[d] * widen(k[d]);
  return sum;
}

// The pass's q rows widened to fp32: [heads][kHeadDimMax].
struct WideQ {
  float q[kGroupMax * kHeadDimMax];
  const float* row(uint32_t g) const { return q + g * kHeadDimMax; }
  WideQ(const bf16* src, uint32_t heads, uint32_t dim) {
    for (uint32_t g = 0; g < heads; ++g)
      for (uint32_t d = 0; d < dim; ++d) q[g * kHeadDimMax + d] = src[g * dim + d].to_float();
  }
};

// Online softmax of `heads` q heads (DESIGN.md section 10), fed a tile of
// scores at a time.
class OnlineSoftmax {
 public:
  OnlineSoftmax(uint32_t heads, uint32_t dim) : heads_(heads), dim_(dim) {
    std::fill_n(m_, heads, -kInf);
    std::fill_n(l_, heads, 0.f);
    std::fill_n(o_, heads * kHeadDimMax, 0.f);
  }

  // Adds n rows with scores s[g][t] and values value_at(t); s is overwritten
  // with the weights. The tile is summed apart and then added, so over a long
  // list the rounding grows with sqrt(tiles) + sqrt(tile rows), not sqrt(all rows).
  template <class ValueAt>
  void add(float (*s)[kTileRows], uint32_t n, ValueAt value_at) {
    for (uint32_t g = 0; g < heads_; ++g) weigh(s[g], n, g);
    std::fill_n(tile_, heads_ * kHeadDimMax, 0.f);
    for (uint32_t t = 0; t < n; ++t) {
      const auto* v = value_at(t);
      for (uint32_t g = 0; g < heads_; ++g)
        for (uint32_t d = 0; d < dim_; ++d) tile_[g * kHeadDimMax + d] += s[g][t] * widen(v[d]);
    }
    for (uint32_t i = 0; i < heads_ * kHeadDimMax; ++i) o_[i] += tile_[i];
  }

  // o [heads][dim] normalised, lse [heads]; a head that saw no finite score is (0, -inf).
  void finish(float* o, float* lse) const {
    for (uint32_t g = 0; g < heads_; ++g) {
      const float inv = l_[g] == 0 ? 0.f : 1.f / l_[g];
      for (uint32_t d = 0; d < dim_; ++d) o[g * dim_ + d] = o_[g * kHeadDimMax + d] * inv;
      lse[g] = l_[g] == 0 ? -kInf : m_[g] + std::log(l_[g]);
    }
  }

 private:
  void weigh(float* s, uint32_t n, uint32_t g) {
    const float m_new = std::max(m_[g], *std::max_element(s, s + n));
    if (m_new == -kInf) {  // nothing finite yet: -inf - -inf would be NaN
      std::fill_n(s, n, 0.f);
      return;
    }
    if (m_new != m_[g]) {
      // exp(m_old - m_new) is 0 while m_old is -inf, where o and l are still 0.
      const float shrink = std::exp(m_[g] - m_new);
      l_[g] *= shrink;
      for (uint32_t d = 0; d < dim_; ++d) o_[g * kHeadDimMax + d] *= shrink;
      m_[g] = m_new;
    }
    float sum = 0;
    for (uint32_t t = 0; t < n; ++t) sum += (s[t] = std::exp(s[t] - m_new));
    l_[g] += sum;
  }

  uint32_t heads_, dim_;
  float m_[kGroupMax], l_[kGroupMax];
  float o_[kGroupMax * kHeadDimMax];
  float tile_[kGroupMax * kHeadDimMax];
};

// Calls f(g0, heads) for each pass of at most kGroupMax q heads.
template <class F>
void for_each_pass(const QGroup& q, F&& f) {
  for (uint32_t g0 = 0; g0 < q.heads; g0 += kGroupMax) f(g0, std::min(kGroupMax, q.heads - g0));
}

float minmax_bound(const float* q, const float* lo, const float* hi, uint32_t dim) {
  float sum = 0;
  for (uint32_t d = 0; d < dim; ++d) sum += std::max(q[d] * lo[d], q[d] * hi[d]);
  return sum;
}

// The rule's score of block b for the pass's heads (before the max over passes).
float score_block(const WideQ& q, uint32_t heads, const SummaryRows& rows, uint32_t dim, float scale,
                  ScoreRule rule, uint32_t b) {
  float best = -kInf;
  for (uint32_t g = 0; g < heads; ++g) {
    float s = 0;
    if (rule == ScoreRule::kMinMaxBound)
      s = minmax_bound(q.row(g), rows.kmin + b * rows.stride_f32, rows.kmax + b * rows.stride_f32, dim);
    else if (rows.kmean_bf16 != nullptr)
      s = dot(q.row(g), rows.kmean_bf16 + b * rows.stride_bf16, dim);
    else
      s = dot(q.row(g), rows.kmean + b * rows.stride_f32, dim);
    best = std::max(best, scale * s);
  }
  return best;
}

}  // namespace

void build_summary(const bf16* k, const bf16* v, uint32_t tokens, uint32_t head_dim, const SummaryOut& out) {
  for (uint32_t d = 0; d < head_dim; ++d) {
    float ksum = 0, vsum = 0, lo = kInf, hi = -kInf;
    for (uint32_t t = 0; t < tokens; ++t) {
      const float x = k[uint64_t{t} * head_dim + d].to_float();
      ksum += x;
      lo = std::min(lo, x);
      hi = std::max(hi, x);
      vsum += v[uint64_t{t} * head_dim + d].to_float();
    }
    // Division, not multiplication by 1/n: the mean is the correctly rounded quotient of the sum.
    out.kmean[d] = ksum / static_cast<float>(tokens);
    out.vmean[d] = vsum / static_cast<float>(tokens);
    if (out.kmin != nullptr) {
      out.kmin[d] = lo;
      out.kmax[d] = hi;
    }
  }
}

void score_summaries(const QGroup& q, const SummaryRows& rows, float scale, ScoreRule rule, uint32_t begin,
                     uint32_t end, float* scores) {
  for_each_pass(q, [&](uint32_t g0, uint32_t heads) {
    const WideQ wq(q.q + uint64_t{g0} * q.head_dim, heads, q.head_dim);
    for (uint32_t b = begin; b < end; ++b) {
      const float s = score_block(wq, heads, rows, q.head_dim, scale, rule, b);
      scores[b] = g0 == 0 ? s : std::max(scores[b], s);
    }
  });
}

void attend_blocks(const QGroup& q, const HostBlock* blocks, uint64_t count, uint32_t chunk_tokens, float scale,
                   float* o, float* lse) {
  const uint32_t dim = q.head_dim;
  for_each_pass(q, [&](uint32_t g0, uint32_t heads) {
    const WideQ wq(q.q + uint64_t{g0} * dim, heads, dim);
    OnlineSoftmax softmax(heads, dim);
    float s[kGroupMax][kTileRows];
    for (uint64_t i = 0; i < count; ++i) {
      const uint32_t n = blocks[i].tokens;
      if (n == 0) continue;
      const bf16* k = blocks[i].data;
      const bf16* v = k + uint64_t{chunk_tokens} * dim;
      for (uint32_t t = 0; t < n; ++t)
        for (uint32_t g = 0; g < heads; ++g) s[g][t] = scale * dot(wq.row(g), k + uint64_t{t} * dim, dim);
      softmax.add(s, n, [&](uint32_t t) { return v + uint64_t{t} * dim; });
    }
    softmax.finish(o + uint64_t{g0} * dim, lse + g0);
  });
}

void far_field(const QGroup& q, const SummaryRows& rows, const uint32_t* blocks, uint64_t count, float scale,
               float* o, float* lse) {
  const uint32_t dim = q.head_dim;
  for_each_pass(q, [&](uint32_t g0, uint32_t heads) {
    const WideQ wq(q.q + uint64_t{g0} * dim, heads, dim);
    OnlineSoftmax softmax(heads, dim);
    float s[kGroupMax][kTileRows];
    for (uint64_t i0 = 0; i0 < count; i0 += kTileRows) {
      const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(kTileRows, count - i0));
      const uint32_t* ids = blocks + i0;
      for (uint32_t t = 0; t < n; ++t) {
        const float bias = rows.ln_tokens[rows.tokens[ids[t]]];
        for (uint32_t g = 0; g < heads; ++g) {
          const float qk = rows.kmean_bf16 != nullptr ? dot(wq.row(g), rows.kmean_bf16 + ids[t] * rows.stride_bf16, dim)
                                                      : dot(wq.row(g), rows.kmean + ids[t] * rows.stride_f32, dim);
          s[g][t] = scale * qk + bias;
        }
      }
      softmax.add(s, n, [&](uint32_t t) { return rows.vmean + ids[t] * rows.stride_f32; });
    }
    softmax.finish(o + uint64_t{g0} * dim, lse + g0);
  });
}

}  // namespace kvtier::cpu::isa::scalar
