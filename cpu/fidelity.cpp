#include "kvtier/cpu/fidelity.h"

#include <oneapi/tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace kvtier::cpu {
namespace {

// invalid_argument("fidelity: " + parts...), so each check reads as one line.
template <class... Parts>
Status bad(const Parts&... parts) {
  std::ostringstream os;
  os << "fidelity: ";
  (os << ... << parts);
  return invalid_argument(os.str());
}

uint32_t chunk_count(uint64_t tokens, uint32_t chunk_tokens) {
  return static_cast<uint32_t>((tokens + chunk_tokens - 1) / chunk_tokens);
}

// Summed in the same order as the reference's dot product, so that a full
// budget recalls a mass that sums to 1 within rounding of the exponentials alone.
double dot(Bf16View<1> a, Bf16View<1> b) {
  double s = 0;
  for (size_t d = 0; d < a.size(); ++d) s += static_cast<double>(a(d).to_float()) * b(d).to_float();
  return s;
}

Status check_context(Bf16View<2> q, const ref::LayerKv& kv, uint32_t chunk_tokens, double scale) {
  if (kv.k.shape() != kv.v.shape())
    return bad("K is ", kv.k.extent(0), "x", kv.k.extent(1), "x", kv.k.extent(2), " but V is ", kv.v.extent(0), "x",
               kv.v.extent(1), "x", kv.v.extent(2), " (kv_heads x tokens x head_dim)");
  if (kv.kv_heads() == 0) return bad("kv_heads=0: the layer has no KV heads");
  if (kv.tokens() == 0) return bad("tokens=0: the context is empty, there is nothing to compare with");
  if (q.extent(0) == 0) return bad("q_heads=0: q has no heads");
  if (q.extent(0) % kv.kv_heads() != 0)
    return bad("q_heads=", q.extent(0), " is not a multiple of kv_heads=", kv.kv_heads());
  if (q.extent(1) != kv.head_dim())
    return bad("q head_dim=", q.extent(1), " differs from the KV head_dim=", kv.head_dim());
  if (chunk_tokens == 0) return bad("chunk_tokens=0");
  if (!(std::isfinite(scale) && scale > 0)) return bad("scale=", scale, " must be finite and positive");
  return Status::ok_status();
}

// Each list in range and without repeats; `what` names the lists in messages.
Status check_chunk_lists(std::span<const std::vector<uint32_t>> lists, const char* what, uint64_t tokens,
                         uint32_t kv_heads, uint32_t chunk_tokens) {
  if (lists.size() != kv_heads) return bad(lists.size(), " ", what, " lists for kv_heads=", kv_heads);
  const uint32_t chunks = chunk_count(tokens, chunk_tokens);
  std::vector<bool> seen(chunks);
  for (uint32_t h = 0; h < kv_heads; ++h) {
    std::fill(seen.begin(), seen.end(), false);
    for (uint32_t c : lists[h]) {
      if (c >= chunks)
        return bad("KV head ", h, " lists ", what, " chunk ", c, ", but ", tokens, " tokens make ", chunks,
                   " chunks of ", chunk_tokens);
      if (seen[c]) return bad("KV head ", h, " lists ", what, " chunk ", c, " twice");
      seen[c] = true;
    }
  }
  return Status::ok_status();
}

Status check_output(const PartialState& out, size_t q_heads, uint32_t head_dim) {
  if (out.heads != q_heads || out.head_dim != head_dim)
    return bad("sparse_output is ", out.heads, "x", out.head_dim, " (q_heads x head_dim), q is ", q_heads, "x",
               head_dim);
  if (out.o.size() != size_t{out.heads} * out.head_dim || out.lse.size() != out.heads)
    return bad("sparse_output holds ", out.o.size(), " o values and ", out.lse.size(), " lse values for ",
               out.heads, "x", out.head_dim);
  for (size_t i = 0; i < out.o.size(); ++i)
    if (!std::isfinite(out.o[i]))
      return bad("sparse_output o[", i / head_dim, "][", i % head_dim, "]=", out.o[i], " is not finite");
  return Status::ok_status();
}

// Share of q head h's dense softmax mass on the tokens of `chunks`.
double mass_on(Bf16View<2> q, uint32_t h, Bf16View<2> k, std::span<const uint32_t> chunks, uint32_t chunk_tokens,
               double scale, double lse) {
  double mass = 0;
  for (uint32_t c : chunks) {
    const uint64_t begin = uint64_t{c} * chunk_tokens, end = std::min<uint64_t>(begin + chunk_tokens, k.extent(0));
    for (uint64_t t = begin; t < end; ++t) mass += std::exp(scale * dot(q[h], k[t]) - lse);
  }
  return mass;
}

double relative_l2(const PartialState& sparse, const PartialState64& dense) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < dense.o.size(); ++i) {
    const double e = static_cast<double>(sparse.o[i]) - dense.o[i];
    diff += e * e;
    norm += dense.o[i] * dense.o[i];
  }
  // All values zero: the output is exactly zero, so any difference is infinitely wrong.
  if (norm == 0) return diff == 0 ? 0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff / norm);
}

}  // namespace


Result<AttendedSet> attended_set(const SparsityPolicy& policy, uint64_t tokens,
                                 std::span<const std::vector<uint32_t>> selected) {
  KVT_RETURN_IF_ERROR(validate(policy));
  const ChunkRanges r = chunk_ranges(policy, tokens);
  AttendedSet set;
  for (uint32_t h = 0; h < selected.size(); ++h) {
    std::vector<bool> picked(r.far_end - r.far_begin);
    for (uint32_t c : selected[h]) {
      if (c < r.far_begin || c >= r.far_end)
        return bad("KV head ", h, " selected chunk ", c, ", which is not a far chunk (far chunks are [", r.far_begin,
                   ", ", r.far_end, ") at ", tokens, " tokens)");
      if (picked[c - r.far_begin]) return bad("KV head ", h, " selected chunk ", c, " twice");
      picked[c - r.far_begin] = true;
    }
    std::vector<uint32_t>& exact = set.chunks.emplace_back();
    std::vector<uint32_t>& far = set.far_field.emplace_back();
    for (uint32_t c = 0; c < r.chunks; ++c) {
      const bool is_far = c >= r.far_begin && c < r.far_end;
      if (!is_far || picked[c - r.far_begin]) exact.push_back(c);
      else if (policy.far_field == FarField::kSummary) far.push_back(c);
    }
  }
  return set;
}

Result<FidelityReport> measure_fidelity(Bf16View<2> q, const ref::LayerKv& kv,
                                        std::span<const std::vector<uint32_t>> attended_chunks,
                                        uint32_t chunk_tokens, const PartialState& sparse_output, double scale) {
  KVT_RETURN_IF_ERROR(check_context(q, kv, chunk_tokens, scale));
  KVT_RETURN_IF_ERROR(check_chunk_lists(attended_chunks, "attended", kv.tokens(), kv.kv_heads(), chunk_tokens));
  KVT_RETURN_IF_ERROR(check_output(sparse_output, q.extent(0), kv.head_dim()));
  // The reference is O(context) per q head: at 1M tokens seconds per step. KV
  // heads are independent, so each runs the same fp64 reference on its own
  // slice (its q heads, its K and V) on its own thread; the numbers are those
  // of one call over all heads.
  const uint32_t q_heads = static_cast<uint32_t>(q.extent(0)), kv_heads = kv.kv_heads(), group = q_heads / kv_heads;
  const size_t dim = kv.head_dim(), tokens = kv.tokens();
  PartialState64 dense = PartialState64::empty(q_heads, static_cast<uint32_t>(dim));
  FidelityReport report;
  report.mass_recall.resize(q_heads);
  tbb::parallel_for(uint32_t{0}, kv_heads, [&](uint32_t kh) {
    const Bf16View<2> qh(q.data().subspan(size_t{kh} * group * dim, group * dim), {group, dim});
    const ref::LayerKv one{Bf16View<3>(kv.k.data().subspan(kh * tokens * dim, tokens * dim), {1, tokens, dim}),
                           Bf16View<3>(kv.v.data().subspan(kh * tokens * dim, tokens * dim), {1, tokens, dim})};
    const PartialState64 part = ref::dense_attention(qh, one, scale);
    for (uint32_t g = 0; g < group; ++g) {
      const uint32_t h = kh * group + g;
      std::copy(part.o_row(g).begin(), part.o_row(g).end(), dense.o_row(h).begin());
      dense.lse[h] = part.lse[g];
      report.mass_recall[h] = mass_on(q, h, kv.k[kh], attended_chunks[kh], chunk_tokens, scale, dense.lse[h]);
    }
  });
  report.rel_error = relative_l2(sparse_output, dense);
  report.mass_recall_min = *std::min_element(report.mass_recall.begin(), report.mass_recall.end());
  double sum = 0;
  for (double m : report.mass_recall) sum += m;
  report.mass_recall_mean = sum / q_heads;
  return report;
}

Result<FidelityReport> measure_fidelity(Bf16View<2> q, const ref::LayerKv& kv, const AttendedSet& attended,
                                        uint32_t chunk_tokens, const PartialState& sparse_output, double scale) {
  KVT_RETURN_IF_ERROR(check_context(q, kv, chunk_tokens, scale));
  if (!attended.far_field.empty()) {
    KVT_RETURN_IF_ERROR(check_chunk_lists(attended.far_field, "far-field", kv.tokens(), kv.kv_heads(), chunk_tokens));
    KVT_RETURN_IF_ERROR(check_chunk_lists(attended.chunks, "attended", kv.tokens(), kv.kv_heads(), chunk_tokens));
    // A chunk both attended and summarised would count its tokens twice in the sparse output.
    for (uint32_t h = 0; h < kv.kv_heads(); ++h)
      for (uint32_t c : attended.far_field[h])
        if (std::find(attended.chunks[h].begin(), attended.chunks[h].end(), c) != attended.chunks[h].end())
          return bad("KV head ", h, " lists chunk ", c, " both as attended and as far field");
  }
  return measure_fidelity(q, kv, attended.chunks, chunk_tokens, sparse_output, scale);
}

double needle_recall(std::span<const NeedleTrial> trials) {
  uint64_t pairs = 0, hits = 0;
  for (const NeedleTrial& t : trials)
    for (const std::vector<uint32_t>& sel : t.selected) {
      ++pairs;
      hits += std::find(sel.begin(), sel.end(), t.needle_chunk) != sel.end();
    }
  return pairs == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(pairs);
}

std::vector<double> depths(uint32_t n) {
  std::vector<double> out(n);
  for (uint32_t i = 0; i < n; ++i) out[i] = n == 1 ? 0.0 : static_cast<double>(i) / (n - 1);
  return out;
}

uint64_t depth_token(double depth, uint64_t tokens) {
  KVT_ASSERT(tokens > 0 && depth >= 0 && depth <= 1, "depth=", depth, " tokens=", tokens);
  return static_cast<uint64_t>(std::llround(depth * static_cast<double>(tokens - 1)));
}

}  // namespace kvtier::cpu
