// score_summaries (the GPU summary scorer) against an fp64 oracle of the
// kMaxDot rule and against the CPU scorer on the same cpu::SummaryTable rows:
// random bf16 q and mean keys (bf16 and fp32 rows), odd block counts and
// ranges that start past 0, every GQA group, padded row strides. Scores are
// poisoned first: every score in the range must be written, every score
// outside it must keep its poison. Exits 77 without a CUDA build or GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gpu_test_util.h"
#include "kvtier/cpu/kernels.h"
#include "kvtier/gpu/kernels.h"
#include "random.h"

using namespace kvtier;
using test::cuda_context_or_skip;
using test::DeviceBuffer;

namespace {

void require_ok(const Status& s) { REQUIRE_MESSAGE(s.ok(), s.to_string()); }

struct ScoreCase {
  uint32_t kv_heads, group, head_dim, blocks, begin, end;
  bool f32;
  uint64_t row_stride;
};

// The fp32 sum of n products of exact fp32 values differs from the exact sum
// by at most about n * 2^-24 times the sum of their magnitudes (each of the n
// roundings of a partial sum); twice that, plus the fp32 products' own
// rounding for fp32 rows, bounds either order of summation.
double bound(double abs_sum, uint32_t n, float scale) { return scale * abs_sum * (3.0 * n + 2) * 0x1p-24 + 1e-30; }

void run_case(gpu::CudaContext& ctx, const ScoreCase& c, uint64_t salt) {
  CAPTURE(c.kv_heads);
  CAPTURE(c.group);
  CAPTURE(c.head_dim);
  CAPTURE(c.blocks);
  CAPTURE(c.begin);
  CAPTURE(c.end);
  CAPTURE(c.f32);
  CAPTURE(c.row_stride);
  std::mt19937_64 gen = test::rng(salt);
  const uint32_t qh = c.kv_heads * c.group, D = c.head_dim;
  const std::vector<bf16> q = test::random_bf16(size_t{qh} * D, gen, -2.f, 2.f);
  const uint64_t rows = uint64_t{c.kv_heads} * c.blocks;
  const std::vector<bf16> kb = test::random_bf16(rows * c.row_stride, gen, -2.f, 2.f);
  std::vector<float> kf(rows * c.row_stride);
  std::uniform_real_distribution<float> dist(-2.f, 2.f);
  for (float& x : kf) x = dist(gen);
  const float scale = 1.f / std::sqrt(float(D));

  DeviceBuffer<bf16> dq(ctx, q);
  DeviceBuffer<bf16> dkb(ctx, kb);
  DeviceBuffer<float> dkf(ctx, kf);
  const uint64_t stride = c.blocks + 3;  // a scores row longer than the table's
  DeviceBuffer<float> out(ctx, c.kv_heads * stride);
  out.poison();
  gpu::ScoreArgs a;
  a.q = dq.get();
  a.q_heads = qh;
  a.kv_heads = c.kv_heads;
  a.head_dim = D;
  a.kmean = c.f32 ? static_cast<const void*>(dkf.get()) : static_cast<const void*>(dkb.get());
  a.kmean_f32 = c.f32;
  a.row_stride = c.row_stride;
  a.head_rows = c.blocks;
  a.block_begin = c.begin;
  a.block_end = c.end;
  a.scale = scale;
  a.scores = out.get();
  a.scores_stride = stride;
  require_ok(gpu::score_summaries(a, ctx.compute_stream()));
  test::sync_or_fail(ctx);
  const std::vector<float> got = out.download();

  uint64_t bad = 0;
  for (uint32_t h = 0; h < c.kv_heads; ++h)
    for (uint64_t b = 0; b < stride; ++b) {
      const float g = got[h * stride + b];
      if (b < c.begin || b >= c.end) {
        if (!std::isnan(g) && bad++ < 5) FAIL_CHECK("head ", h, " block ", b, " outside the range was written: ", g);
        continue;
      }
      double best = -INFINITY, tol = 0;
      for (uint32_t gq = 0; gq < c.group; ++gq) {
        double dot = 0, mag = 0;
        for (uint32_t d = 0; d < D; ++d) {
          const double x = q[(size_t{h} * c.group + gq) * D + d].to_float();
          const uint64_t e = (uint64_t{h} * c.blocks + b) * c.row_stride + d;
          const double k = c.f32 ? double(kf[e]) : double(kb[e].to_float());
          dot += x * k;
          mag += std::fabs(x * k);
        }
        best = std::max(best, double(scale) * dot);
        tol = std::max(tol, bound(mag, D, scale));
      }
      if (!(std::fabs(g - best) <= tol) && bad++ < 5)
        FAIL_CHECK("head ", h, " block ", b, ": ", g, " vs fp64 ", best, " (bound ", tol, ")");
    }
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("score_summaries matches the fp64 max-dot rule over its range and writes nothing else") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  uint64_t salt = 500;
  for (const bool f32 : {false, true})
    for (const uint32_t group : {1u, 2u, 4u, 8u})
      for (const uint32_t D : {64u, 128u, 40u}) {
        const uint64_t tight = f32 ? (D + 15) / 16 * 16 : (D + 31) / 32 * 32;  // cpu::SummaryTable's strides
        run_case(ctx, {1, group, D, 1, 0, 1, f32, tight}, ++salt);
        run_case(ctx, {3, group, D, 17, 2, 17, f32, tight + 8}, ++salt);
        run_case(ctx, {2, group, D, 97, 5, 90, f32, tight}, ++salt);
        run_case(ctx, {8, group, D, 1031, 0, 1031, f32, tight}, ++salt);
      }
}

TEST_CASE("score_summaries agrees with the CPU scorer on a SummaryTable's own rows") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  std::mt19937_64 gen = test::rng(900);
  for (const SummaryKind kind : {SummaryKind::kMeanBf16, SummaryKind::kMeanF32}) {
    const uint32_t kvh = 8, group = 4, D = 128, blocks = 333, qh = kvh * group;
    cpu::SummaryTable table(kvh, blocks, D, kind);
    std::uniform_real_distribution<float> dist(-1.f, 1.f);
    for (uint32_t h = 0; h < kvh; ++h)
      for (uint32_t b = 0; b < blocks; ++b)
        for (uint32_t d = 0; d < D; ++d) {
          if (kind == SummaryKind::kMeanBf16)
            table.kmean_bf16(h, b)[d] = bf16::from_float(dist(gen));
          else
            table.kmean_f32(h, b)[d] = dist(gen);
        }
    const bool f32 = kind == SummaryKind::kMeanF32;
    const uint64_t row_stride = table.kmean_row_stride();
    const uint64_t bytes = uint64_t{kvh} * blocks * row_stride * (f32 ? 4 : 2);
    DeviceBuffer<std::byte> dk(ctx, bytes);
    require_ok(ctx.upload(dk.get(), table.kmean_rows(), bytes));
    const std::vector<bf16> q = test::random_bf16(size_t{qh} * D, gen);
    DeviceBuffer<bf16> dq(ctx, q);
    DeviceBuffer<float> out(ctx, size_t{kvh} * blocks);
    out.poison();
    const float scale = 1.f / std::sqrt(float(D));
    gpu::ScoreArgs a;
    a.q = dq.get();
    a.q_heads = qh;
    a.kv_heads = kvh;
    a.head_dim = D;
    a.kmean = dk.get();
    a.kmean_f32 = f32;
    a.row_stride = row_stride;
    a.head_rows = blocks;
    a.block_begin = 0;
    a.block_end = blocks;
    a.scale = scale;
    a.scores = out.get();
    a.scores_stride = blocks;
    require_ok(gpu::score_summaries(a, ctx.compute_stream()));
    test::sync_or_fail(ctx);
    const std::vector<float> got = out.download();
    std::vector<float> want(size_t{kvh} * blocks);
    cpu::score_summaries(cpu::best_isa(), Bf16View<2>(q, {qh, D}), table, scale, cpu::ScoreRule::kMaxDot, 0, blocks,
                         MutF32View<2>(want, {kvh, blocks}));
    uint64_t bad = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      // Both are fp32 sums of the same products in different orders: within
      // twice the bound of either against the exact sum (|q|, |k| <= 1).
      const double tol = 2 * bound(double(D), D, scale);
      if (!(std::fabs(double(got[i]) - want[i]) <= tol) && bad++ < 5)
        FAIL_CHECK(summary_kind_name(kind), " score ", i, ": GPU ", got[i], " vs CPU ", want[i]);
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("score_summaries refuses bad arguments, naming the field") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  DeviceBuffer<bf16> q(ctx, 8 * 64), k(ctx, 64 * 64);
  DeviceBuffer<float> s(ctx, 64);
  gpu::ScoreArgs good;
  good.q = q.get();
  good.q_heads = 4;
  good.kv_heads = 1;
  good.head_dim = 64;
  good.kmean = k.get();
  good.row_stride = 64;
  good.head_rows = 64;
  good.block_end = 64;
  good.scale = 0.125f;
  good.scores = s.get();
  good.scores_stride = 64;
  require_ok(gpu::score_summaries(good, ctx.compute_stream()));
  struct Bad {
    const char* field;
    void (*mutate)(gpu::ScoreArgs&);
  };
  const Bad cases[] = {
      {"q", [](gpu::ScoreArgs& a) { a.q = nullptr; }},
      {"q_heads", [](gpu::ScoreArgs& a) { a.q_heads = 3; }},
      {"q_heads / kv_heads", [](gpu::ScoreArgs& a) { a.q_heads = 3 * a.kv_heads; }},
      {"head_dim", [](gpu::ScoreArgs& a) { a.head_dim = 60; }},
      {"row_stride", [](gpu::ScoreArgs& a) { a.row_stride = 60; }},
      {"row_stride", [](gpu::ScoreArgs& a) { a.row_stride = 68; }},
      {"block_begin", [](gpu::ScoreArgs& a) { a.block_begin = 10, a.block_end = 5; }},
      {"head_rows", [](gpu::ScoreArgs& a) { a.head_rows = 63; }},
      {"scores_stride", [](gpu::ScoreArgs& a) { a.scores_stride = 63; }},
      {"kmean is not 16-byte aligned", [](gpu::ScoreArgs& a) { a.kmean = static_cast<const std::byte*>(a.kmean) + 2; }},
  };
  for (const Bad& c : cases) {
    gpu::ScoreArgs a = good;
    c.mutate(a);
    const Status st = gpu::score_summaries(a, ctx.compute_stream());
    CHECK_MESSAGE(st.code() == StatusCode::kInvalidArgument, c.field, ": ", st.to_string());
    CHECK_MESSAGE(st.message().find(c.field) != std::string::npos, c.field, ": ", st.to_string());
  }
  test::sync_or_fail(ctx);
}
