#include "kvtier/cpu/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvtier::cpu::ref {
namespace {

// Online softmax accumulator of one q head, in double.
struct Accumulator {
  double m = -std::numeric_limits<double>::infinity();
  double l = 0;
  std::vector<double> acc;

  explicit Accumulator(uint32_t dim) : acc(dim, 0.0) {}

  void add(double score, Bf16View<1> v) {
    if (score > m) {
      const double shrink = std::exp(m - score);  // exp(-inf) = 0 on the first token
      l *= shrink;
      for (double& a : acc) a *= shrink;
      m = score;
    }
    const double w = std::exp(score - m);
    l += w;
    for (size_t d = 0; d < acc.size(); ++d) acc[d] += w * static_cast<double>(v(d).to_float());
  }

  void store(PartialState64& out, uint32_t head) const {
    if (l == 0) return;  // empty set: out already holds (0, -inf)
    std::span<double> o = out.o_row(head);
    for (size_t d = 0; d < acc.size(); ++d) o[d] = acc[d] / l;
    out.lse[head] = m + std::log(l);
  }
};

double dot(Bf16View<1> a, Bf16View<1> b) {
  double s = 0;
  for (size_t d = 0; d < a.size(); ++d) s += static_cast<double>(a(d).to_float()) * b(d).to_float();
  return s;
}

uint32_t group_of(Bf16View<2> q, size_t kv_heads) {
  const size_t q_heads = q.extent(0);
  KVT_ASSERT(kv_heads >= 1 && q_heads % kv_heads == 0, "q_heads=", q_heads, " kv_heads=", kv_heads);
  return static_cast<uint32_t>(q_heads / kv_heads);
}

}  // namespace

double default_scale(uint32_t head_dim) { return 1.0 / std::sqrt(static_cast<double>(head_dim)); }

PartialState64 attend_blocks(Bf16View<2> q, const std::vector<std::vector<BlockKv>>& blocks, double scale) {
  const uint32_t q_heads = static_cast<uint32_t>(q.extent(0));
  const uint32_t dim = static_cast<uint32_t>(q.extent(1));
  const uint32_t group = group_of(q, blocks.size());
  PartialState64 out = PartialState64::empty(q_heads, dim);
  for (uint32_t h = 0; h < q_heads; ++h) {
    Accumulator acc(dim);
    for (const BlockKv& b : blocks[h / group]) {
      KVT_ASSERT(b.k.extent(1) == dim && b.v.extent(1) == dim && b.k.extent(0) == b.v.extent(0),
                 "block K ", b.k.extent(0), "x", b.k.extent(1), " V ", b.v.extent(0), "x", b.v.extent(1),
                 " head_dim ", dim);
      for (size_t t = 0; t < b.k.extent(0); ++t) acc.add(scale * dot(q[h], b.k[t]), b.v[t]);
    }
    acc.store(out, h);
  }
  return out;
}

std::vector<std::vector<BlockKv>> blocks_of(const LayerKv& kv, uint32_t chunk_tokens,
                                            const std::vector<std::vector<uint32_t>>& chunks) {
  KVT_ASSERT_EQ(chunks.size(), size_t{kv.kv_heads()});
  KVT_ASSERT(chunk_tokens > 0, "chunk_tokens=0");
  const size_t dim = kv.head_dim();
  std::vector<std::vector<BlockKv>> out(chunks.size());
  for (uint32_t h = 0; h < kv.kv_heads(); ++h) {
    for (uint32_t c : chunks[h]) {
      const uint64_t begin = uint64_t{c} * chunk_tokens;
      KVT_ASSERT(begin < kv.tokens(), "chunk ", c, " starts at token ", begin, " of ", kv.tokens());
      const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk_tokens, kv.tokens() - begin));
      auto slice = [&](Bf16View<3> t) {
        return Bf16View<2>(t[h].data().subspan(begin * dim, n * dim), {n, dim});
      };
      out[h].push_back(BlockKv{slice(kv.k), slice(kv.v)});
    }
  }
  return out;
}

PartialState64 dense_attention(Bf16View<2> q, const LayerKv& kv, double scale) {
  KVT_ASSERT(kv.k.shape() == kv.v.shape(), "K and V shapes differ");
  KVT_ASSERT_EQ(q.extent(1), size_t{kv.head_dim()});
  const uint32_t q_heads = static_cast<uint32_t>(q.extent(0)), dim = kv.head_dim();
  const uint32_t group = group_of(q, kv.kv_heads());
  PartialState64 out = PartialState64::empty(q_heads, dim);
  if (kv.tokens() == 0) return out;
  // Two passes (all scores, then softmax) rather than the online update of
  // attend_blocks(), so the two reference paths do not share their arithmetic.
  std::vector<double> scores(kv.tokens());
  for (uint32_t h = 0; h < q_heads; ++h) {
    const Bf16View<2> k = kv.k[h / group], v = kv.v[h / group];
    for (size_t t = 0; t < scores.size(); ++t) scores[t] = scale * dot(q[h], k[t]);
    const double m = *std::max_element(scores.begin(), scores.end());
    double l = 0;
    for (double& s : scores) l += (s = std::exp(s - m));
    std::span<double> o = out.o_row(h);
    for (size_t t = 0; t < scores.size(); ++t)
      for (uint32_t d = 0; d < dim; ++d) o[d] += scores[t] * v(t, d).to_float();
    for (double& x : o) x /= l;
    out.lse[h] = m + std::log(l);
  }
  return out;
}

}  // namespace kvtier::cpu::ref
