// Block-sparse prefill attention (gpu/prefill.cu) and the cuBLAS GEMM
// (gpu/gemm.cu) against the fp64 CPU oracle.
//
// Each prefill case builds a context of random bf16 K/V, cuts it into chunks,
// stores the chunks a KV head's list names in shuffled, scattered slots of a
// device arena whose unused bytes are NaN, and checks every query against
// ref::attend_blocks over the part of each listed block the query may see
// (keys at or before its position). KVTIER_TEST_QUICK=1 runs a smaller sweep
// (for compute-sanitizer).
//
// Tolerance. Q, K, V are bf16 and S is accumulated in fp32, so scores are
// exact to ~1e-6. P is rounded to bf16 (8 significant bits, relative error
// <= 2^-8) before the P.V product while the row sum l adds the unrounded
// weights, so o's weights sum to 1 within 2^-8 and each is off by <= 2^-8
// relative: |o - o_ref| stays well under 1e-2 * max|v|. lse = m + ln(l)
// carries l's relative error as an absolute error: ex2.approx (2^-22 per
// weight) and fp32 summation over n keys (<= n * 2^-24 relative, ~1e-4 for
// the longest lists here) bound it far below 1e-3. (Until 2026-11-28 l added
// the rounded weights, and this file claimed a 2^-9 rounding bound for them:
// seed 6032511403871404720 gave 2.004e-3 against a 2e-3 tolerance on the H200.)
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <thread>
#include <atomic>
#include <vector>

#include "gpu_test_util.h"
#include "kvtier/cpu/reference.h"
#include "kvtier/gpu/gemm.h"
#include "kvtier/gpu/kernels.h"
#include "random.h"
#include "skip.h"

using namespace kvtier;
using namespace kvtier::cpu;

namespace {

constexpr double kOTol = 1e-2;    // of max |v|
constexpr double kLseTol = 1e-3;  // absolute, in natural-log units

enum class ListKind {
  kSparse,      // sinks + random earlier chunks + window + the query block's own chunks
  kFull,        // every chunk of the context: dense causal attention
  kFutureOnly,  // only chunks after the last query: nobody sees a key
};

struct Case {
  uint32_t head_dim = 128;
  uint32_t group = 4;
  uint32_t kv_heads = 2;
  uint32_t chunk = 64;
  uint32_t nq = 17;
  uint32_t history_chunks = 12;  // whole chunks before the query block's chunk
  ListKind list = ListKind::kSparse;
  bool last_head_empty = false;  // the last KV head's list holds nothing
  float q_range = 1.f;           // q in [-q_range, q_range]: larger gives peakier softmax
  bool at_context_start = false; // the query block is the context's first tokens (history_chunks must be 0)

  std::string describe() const {
    std::ostringstream os;
    os << "head_dim=" << head_dim << " group=" << group << " kv_heads=" << kv_heads << " chunk=" << chunk
       << " nq=" << nq << " history_chunks=" << history_chunks << " list=" << static_cast<int>(list)
       << " last_head_empty=" << last_head_empty << " q_range=" << q_range;
    return os.str();
  }
};

// A context, its queries and each KV head's block list, on the host.
struct Problem {
  Case c;
  uint32_t q_heads = 0;
  uint64_t tokens = 0;       // context length
  uint64_t q_first_pos = 0;  // position of query 0
  std::vector<bf16> q, k, v;  // q [nq][q_heads][D]; k, v [kv_heads][tokens][D]
  std::vector<std::vector<uint32_t>> chunks;  // per KV head, in list order

  uint64_t chunk_begin(uint32_t ch) const { return uint64_t{ch} * c.chunk; }
  uint32_t chunk_len(uint32_t ch) const {
    return static_cast<uint32_t>(std::min<uint64_t>(c.chunk, tokens - chunk_begin(ch)));
  }
  uint32_t chunk_count() const { return static_cast<uint32_t>((tokens + c.chunk - 1) / c.chunk); }
};

std::vector<uint32_t> sparse_list(const Problem& p, std::mt19937_64& gen) {
  const uint32_t history = p.c.history_chunks;
  constexpr uint32_t kSinks = 2, kWindow = 4;
  std::vector<uint32_t> out = {0, 1};
  REQUIRE(history >= kSinks + kWindow);  // sinks and window must fit before the query block
  std::vector<uint32_t> pool(history - kSinks - kWindow);
  std::iota(pool.begin(), pool.end(), kSinks);
  std::shuffle(pool.begin(), pool.end(), gen);
  pool.resize(pool.size() / 2);
  out.insert(out.end(), pool.begin(), pool.end());
  // The window and the query block's own chunks run on to the end of the context.
  for (uint32_t ch = history - kWindow; ch < p.chunk_count(); ++ch) out.push_back(ch);
  return out;
}

Problem make_problem(const Case& c, std::mt19937_64& gen) {
  Problem p;
  p.c = c;
  p.q_heads = c.group * c.kv_heads;
  // The query block starts somewhere inside chunk history_chunks, so its
  // first chunk is shared with the window and the context ends mid-chunk.
  p.q_first_pos = c.at_context_start ? 0 : uint64_t{c.history_chunks} * c.chunk + gen() % c.chunk;
  p.tokens = p.q_first_pos + c.nq + (c.list == ListKind::kFutureOnly ? 3 * c.chunk : 0);
  p.q = test::random_bf16(size_t{c.nq} * p.q_heads * c.head_dim, gen, -c.q_range, c.q_range);
  p.k = test::random_bf16(size_t{c.kv_heads} * p.tokens * c.head_dim, gen);
  p.v = test::random_bf16(size_t{c.kv_heads} * p.tokens * c.head_dim, gen);
  p.chunks.resize(c.kv_heads);
  const uint64_t last_q_pos = p.q_first_pos + c.nq - 1;
  for (uint32_t h = 0; h < c.kv_heads; ++h) {
    std::vector<uint32_t>& list = p.chunks[h];
    if (c.list == ListKind::kSparse) list = sparse_list(p, gen);
    for (uint32_t ch = 0; ch < p.chunk_count(); ++ch) {
      if (c.list == ListKind::kFull) list.push_back(ch);
      if (c.list == ListKind::kFutureOnly && p.chunk_begin(ch) > last_q_pos) list.push_back(ch);
    }
    std::shuffle(list.begin(), list.end(), gen);
  }
  if (c.last_head_empty) p.chunks.back().clear();
  return p;
}

// The kernel's outputs, downloaded.
struct Outputs {
  std::vector<float> o, lse;
  std::vector<bf16> o_bf16;
};

// Which outputs a launch asks for.
struct Wanted {
  bool o = true, bf16_out = true, lse = true;
};

// Uploads the problem (each listed block into its own slot, slots shuffled by
// layout_seed, every byte no block owns NaN), runs the kernel on poisoned
// outputs, and downloads what it asked for.
Outputs run_prefill(gpu::CudaContext& ctx, const Problem& p, uint64_t layout_seed, Wanted want = {}) {
  const uint32_t dim = p.c.head_dim, chunk = p.c.chunk;
  uint32_t entries = 0;
  for (const auto& list : p.chunks) entries += static_cast<uint32_t>(list.size());
  const uint32_t slots = entries + 7;
  // 32 spare elements per slot: slot_bytes larger than a block must work.
  const size_t slot_elems = size_t{2} * chunk * dim + 32;
  std::vector<uint32_t> slot_of(slots);
  std::iota(slot_of.begin(), slot_of.end(), 0u);
  std::mt19937_64 layout(layout_seed);
  std::shuffle(slot_of.begin(), slot_of.end(), layout);

  std::vector<bf16> arena(slots * slot_elems, bf16::from_bits(0xFFFF));
  std::vector<uint32_t> list_begin = {0}, slot_ids, block_tokens;
  std::vector<uint64_t> first_pos;
  for (uint32_t h = 0; h < p.c.kv_heads; ++h) {
    for (uint32_t ch : p.chunks[h]) {
      const uint32_t slot = slot_of[slot_ids.size()], n = p.chunk_len(ch);
      const size_t src = (size_t{h} * p.tokens + p.chunk_begin(ch)) * dim;
      std::copy_n(p.k.begin() + src, size_t{n} * dim, arena.begin() + slot * slot_elems);
      std::copy_n(p.v.begin() + src, size_t{n} * dim, arena.begin() + slot * slot_elems + size_t{chunk} * dim);
      slot_ids.push_back(slot);
      block_tokens.push_back(n);
      first_pos.push_back(p.chunk_begin(ch));
    }
    list_begin.push_back(static_cast<uint32_t>(slot_ids.size()));
  }

  const size_t rows = size_t{p.c.nq} * p.q_heads;
  test::DeviceBuffer<bf16> d_q(ctx, p.q), d_arena(ctx, arena), d_out_bf16(ctx, rows * dim);
  test::DeviceBuffer<uint32_t> d_begin(ctx, list_begin), d_slots(ctx, std::max<size_t>(slot_ids.size(), 1)),
      d_tokens(ctx, std::max<size_t>(block_tokens.size(), 1));
  test::DeviceBuffer<uint64_t> d_first(ctx, std::max<size_t>(first_pos.size(), 1));
  if (!slot_ids.empty()) {
    d_slots.upload(slot_ids);
    d_tokens.upload(block_tokens);
    d_first.upload(first_pos);
  }
  test::DeviceBuffer<float> d_o(ctx, rows * dim), d_lse(ctx, rows);
  d_o.poison();
  d_lse.poison();
  d_out_bf16.poison();

  gpu::PrefillArgs a;
  a.q = d_q.get();
  a.nq = p.c.nq;
  a.q_heads = p.q_heads;
  a.kv_heads = p.c.kv_heads;
  a.q_first_pos = p.q_first_pos;
  a.arena = {reinterpret_cast<std::byte*>(d_arena.get()), slot_elems * sizeof(bf16), slots, chunk, dim};
  a.list_begin = d_begin.get();
  a.slot_ids = d_slots.get();
  a.block_first_pos = d_first.get();
  a.block_tokens = d_tokens.get();
  a.scale = static_cast<float>(ref::default_scale(dim));
  a.o = want.o ? d_o.get() : nullptr;
  a.out_bf16 = want.bf16_out ? d_out_bf16.get() : nullptr;
  a.lse = want.lse ? d_lse.get() : nullptr;
  const Status st = gpu::prefill_attention(a, ctx.compute_stream());
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  test::sync_or_fail(ctx);

  Outputs out;
  if (want.o) out.o = d_o.download();
  if (want.bf16_out) out.o_bf16 = d_out_bf16.download();
  if (want.lse) out.lse = d_lse.download();
  return out;
}

// f(i) for i in [0, n) on all hardware threads (the fp64 oracle is the slow part).
template <class F>
void parallel_for(uint32_t n, const F& f) {
  const unsigned threads = std::clamp(std::thread::hardware_concurrency(), 1u, 32u);
  std::atomic<uint32_t> next{0};
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (uint32_t i = next++; i < n; i = next++) f(i);
    });
  for (std::thread& t : pool) t.join();
}

// The fp64 state of query i: each listed block cut at the query's position.
PartialState64 oracle(const Problem& p, uint32_t i) {
  const uint32_t dim = p.c.head_dim;
  const uint64_t pos = p.q_first_pos + i;
  const std::span<const bf16> k(p.k), v(p.v);
  std::vector<std::vector<ref::BlockKv>> blocks(p.c.kv_heads);
  for (uint32_t h = 0; h < p.c.kv_heads; ++h) {
    for (uint32_t ch : p.chunks[h]) {
      const uint64_t begin = p.chunk_begin(ch);
      if (begin > pos) continue;
      const size_t n = static_cast<size_t>(std::min<uint64_t>(p.chunk_len(ch), pos - begin + 1));
      const size_t off = (size_t{h} * p.tokens + begin) * dim;
      blocks[h].push_back({Bf16View<2>(k.subspan(off, n * dim), {n, size_t{dim}}),
                           Bf16View<2>(v.subspan(off, n * dim), {n, size_t{dim}})});
    }
  }
  const size_t q_elems = size_t{p.q_heads} * dim;
  return ref::attend_blocks(Bf16View<2>(std::span<const bf16>(p.q).subspan(i * q_elems, q_elems), {p.q_heads, dim}),
                            blocks, ref::default_scale(dim));
}

std::vector<PartialState64> oracle_all(const Problem& p) {
  std::vector<PartialState64> refs(p.c.nq);
  parallel_for(p.c.nq, [&](uint32_t i) { refs[i] = oracle(p, i); });
  return refs;
}

double max_abs(const std::vector<bf16>& x) {
  double m = 0;
  for (bf16 e : x) m = std::max(m, std::abs(static_cast<double>(e.to_float())));
  return m;
}

// Compares every output element with the oracle; one CHECK per property,
// naming the worst element.
void check_outputs(const Problem& p, const Outputs& out, const std::vector<PartialState64>& refs) {
  const uint32_t dim = p.c.head_dim;
  const double v_max = std::max(max_abs(p.v), 1e-30);
  double o_err = 0, lse_err = 0;
  std::string o_where, lse_where, bad;
  size_t bf16_mismatch = 0;
  for (uint32_t i = 0; i < p.c.nq; ++i) {
    for (uint32_t h = 0; h < p.q_heads; ++h) {
      const size_t row = size_t{i} * p.q_heads + h;
      const std::string where = "query " + std::to_string(i) + " head " + std::to_string(h);
      for (uint32_t d = 0; d < dim && !out.o.empty(); ++d) {
        const float got = out.o[row * dim + d];
        if (!std::isfinite(got)) bad = where + " o[" + std::to_string(d) + "]=" + std::to_string(got);
        const double err = std::abs(got - refs[i].o[size_t{h} * dim + d]) / v_max;
        if (!(err <= o_err)) o_err = err, o_where = where + " dim " + std::to_string(d);
        if (!out.o_bf16.empty() && !(out.o_bf16[row * dim + d] == bf16::from_float(got))) ++bf16_mismatch;
      }
      if (out.lse.empty()) continue;
      const double want = refs[i].lse[h], got = out.lse[row];
      if (std::isinf(want) || std::isinf(got) || std::isnan(got)) {
        if (!(got == want)) bad = where + " lse=" + std::to_string(got) + " want " + std::to_string(want);
        continue;
      }
      const double err = std::abs(got - want);
      if (err > lse_err) lse_err = err, lse_where = where;
    }
  }
  INFO(p.c.describe(), " q_first_pos=", p.q_first_pos, " tokens=", p.tokens);
  CHECK_MESSAGE(bad.empty(), "non-finite or wrong empty state at ", bad);
  CHECK_MESSAGE(o_err <= kOTol, "o error ", o_err, " of max|v| at ", o_where);
  CHECK_MESSAGE(lse_err <= kLseTol, "lse error ", lse_err, " at ", lse_where);
  CHECK_MESSAGE(bf16_mismatch == 0, bf16_mismatch, " out_bf16 elements differ from the rounded fp32 o");
}

void run_and_check(gpu::CudaContext& ctx, const Case& c, std::mt19937_64& gen) {
  const Problem p = make_problem(c, gen);
  const Outputs out = run_prefill(ctx, p, gen());
  check_outputs(p, out, oracle_all(p));
}

}  // namespace

TEST_CASE("prefill: sparse lists over every head dim, GQA group and chunk size") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed01);
  const std::vector<uint32_t> dims = {64, 128};
  const std::vector<uint32_t> groups = test::quick_sweep() ? std::vector<uint32_t>{1, 8} : std::vector<uint32_t>{1, 2, 4, 8};
  const std::vector<uint32_t> chunks =
      test::quick_sweep() ? std::vector<uint32_t>{16, 256} : std::vector<uint32_t>{16, 64, 128, 256};
  const std::vector<uint32_t> nqs = test::quick_sweep() ? std::vector<uint32_t>{17, 97} : std::vector<uint32_t>{1, 17, 97, 300};
  size_t n = 0;
  for (uint32_t dim : dims)
    for (uint32_t group : groups)
      for (uint32_t chunk : chunks) {
        Case c;
        c.head_dim = dim;
        c.group = group;
        c.chunk = chunk;
        c.nq = nqs[n++ % nqs.size()];
        // Small chunks get a longer history, so that many blocks share a key tile.
        c.history_chunks = test::quick_sweep() ? 12 : std::max(12u, 768u / chunk);
        run_and_check(ctx, c, gen);
      }
}

TEST_CASE("prefill: a partial tail block, 32-token chunks and a peaked softmax over a long query block") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed02);
  Case c;
  c.head_dim = 64;
  c.group = 2;
  c.kv_heads = 3;
  c.chunk = 32;
  c.nq = test::quick_sweep() ? 97 : 700;
  c.history_chunks = 40;
  c.q_range = 8.f;
  run_and_check(ctx, c, gen);
}

TEST_CASE("prefill: a long list of 16-token blocks, many to a key tile") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed07);
  Case c;
  c.head_dim = 128;
  c.group = 8;
  c.kv_heads = 1;
  c.chunk = 16;
  c.nq = 17;
  c.history_chunks = 1200;  // ~600 selected blocks, four to a key tile
  run_and_check(ctx, c, gen);
}

TEST_CASE("prefill: a query block at the start of the context sees exactly the keys up to itself") {
  // Query i sees i + 1 keys: an off-by-one on the diagonal leaves query 0
  // empty or lets it see a second key, which the small counts here expose.
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed0a);
  for (const uint32_t dim : {64u, 128u})
    for (const uint32_t chunk : {16u, 64u}) {
      Case c;
      c.head_dim = dim;
      c.group = 4;
      c.chunk = chunk;
      c.nq = 97;
      c.history_chunks = 0;
      c.at_context_start = true;
      c.list = ListKind::kFull;
      run_and_check(ctx, c, gen);
    }
}

TEST_CASE("prefill: a list of every chunk is dense causal attention") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed03);
  Case c;
  c.head_dim = 128;
  c.group = 4;
  c.chunk = 64;
  c.nq = test::quick_sweep() ? 40 : 300;
  c.history_chunks = 10;
  c.list = ListKind::kFull;
  const Problem p = make_problem(c, gen);
  const Outputs out = run_prefill(ctx, p, gen());
  check_outputs(p, out, oracle_all(p));

  // Independently of the block oracle: dense attention over the first pos + 1
  // tokens, for a few queries.
  const uint32_t dim = c.head_dim;
  for (uint32_t i : {0u, c.nq / 2, c.nq - 1}) {
    const uint64_t n = p.q_first_pos + i + 1;
    std::vector<bf16> k(c.kv_heads * n * dim), v(k.size());
    for (uint32_t h = 0; h < c.kv_heads; ++h) {
      std::copy_n(p.k.begin() + h * p.tokens * dim, n * dim, k.begin() + h * n * dim);
      std::copy_n(p.v.begin() + h * p.tokens * dim, n * dim, v.begin() + h * n * dim);
    }
    const ref::LayerKv kv{Bf16View<3>(k, {c.kv_heads, n, dim}), Bf16View<3>(v, {c.kv_heads, n, dim})};
    const size_t q_elems = size_t{p.q_heads} * dim;
    const PartialState64 dense = ref::dense_attention(
        Bf16View<2>(std::span<const bf16>(p.q).subspan(i * q_elems, q_elems), {p.q_heads, dim}), kv,
        ref::default_scale(dim));
    double o_err = 0, lse_err = 0;
    for (uint32_t h = 0; h < p.q_heads; ++h) {
      for (uint32_t d = 0; d < dim; ++d)
        o_err = std::max(o_err, std::abs(out.o[(size_t{i} * p.q_heads + h) * dim + d] - dense.o[size_t{h} * dim + d]));
      lse_err = std::max(lse_err, std::abs(out.lse[size_t{i} * p.q_heads + h] - dense.lse[h]));
    }
    INFO("query ", i);
    CHECK(o_err / max_abs(p.v) <= kOTol);
    CHECK(lse_err <= kLseTol);
  }
}

TEST_CASE("prefill: queries that see no key get the empty state") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed04);
  SUBCASE("only blocks after the last query, and an empty list") {
    Case c;
    c.head_dim = 128;
    c.group = 8;
    c.chunk = 16;
    c.nq = 33;
    c.list = ListKind::kFutureOnly;
    c.last_head_empty = true;
    const Problem p = make_problem(c, gen);
    REQUIRE(!p.chunks[0].empty());
    const Outputs out = run_prefill(ctx, p, gen());
    CHECK(std::all_of(out.o.begin(), out.o.end(), [](float x) { return x == 0.f; }));
    CHECK(std::all_of(out.o_bf16.begin(), out.o_bf16.end(), [](bf16 x) { return x.bits == 0; }));
    CHECK(std::all_of(out.lse.begin(), out.lse.end(), [](float x) { return x == -std::numeric_limits<float>::infinity(); }));
  }
  SUBCASE("one KV head with an empty list beside a populated one") {
    Case c;
    c.head_dim = 64;
    c.group = 4;
    c.chunk = 64;
    c.nq = 50;
    c.last_head_empty = true;
    run_and_check(ctx, c, gen);
  }
}

TEST_CASE("prefill: each output alone equals the outputs written together") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed05);
  Case c;
  c.head_dim = 128;
  c.group = 2;
  c.chunk = 128;
  c.nq = 97;
  const Problem p = make_problem(c, gen);
  const uint64_t layout = gen();
  const Outputs all = run_prefill(ctx, p, layout);
  const Outputs o_only = run_prefill(ctx, p, layout, {true, false, false});
  const Outputs bf16_only = run_prefill(ctx, p, layout, {false, true, false});
  const Outputs bf16_lse = run_prefill(ctx, p, layout, {false, true, true});
  CHECK(o_only.o == all.o);
  CHECK(bf16_only.o_bf16 == all.o_bf16);
  CHECK(bf16_lse.lse == all.lse);
}

TEST_CASE("prefill: invalid arguments name the field") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  test::DeviceBuffer<bf16> q(ctx, 64 * 2 * 64), arena(ctx, 4 * 2 * 64 * 64);
  test::DeviceBuffer<uint32_t> begin(ctx, std::vector<uint32_t>{0, 1}), slots(ctx, std::vector<uint32_t>{0}),
      tokens(ctx, std::vector<uint32_t>{64});
  test::DeviceBuffer<uint64_t> first(ctx, std::vector<uint64_t>{0});
  test::DeviceBuffer<float> o(ctx, 64 * 2 * 64);
  gpu::PrefillArgs good;
  good.q = q.get();
  good.nq = 64;
  good.q_heads = 2;
  good.kv_heads = 1;
  good.q_first_pos = 0;
  good.arena = {reinterpret_cast<std::byte*>(arena.get()), 2 * 64 * 64 * sizeof(bf16), 4, 64, 64};
  good.list_begin = begin.get();
  good.slot_ids = slots.get();
  good.block_first_pos = first.get();
  good.block_tokens = tokens.get();
  good.scale = 0.125f;
  good.o = o.get();
  const Status ok = gpu::prefill_attention(good, ctx.compute_stream());
  REQUIRE_MESSAGE(ok.ok(), ok.to_string());
  test::sync_or_fail(ctx);

  struct Bad {
    const char* field;
    void (*mutate)(gpu::PrefillArgs&);
  };
  const Bad bads[] = {
      {"q", [](gpu::PrefillArgs& a) { a.q = nullptr; }},
      {"arena.base", [](gpu::PrefillArgs& a) { a.arena.base = nullptr; }},
      {"list_begin", [](gpu::PrefillArgs& a) { a.list_begin = nullptr; }},
      {"slot_ids", [](gpu::PrefillArgs& a) { a.slot_ids = nullptr; }},
      {"block_first_pos", [](gpu::PrefillArgs& a) { a.block_first_pos = nullptr; }},
      {"block_tokens", [](gpu::PrefillArgs& a) { a.block_tokens = nullptr; }},
      {"out_bf16", [](gpu::PrefillArgs& a) { a.o = nullptr; }},
      {"nq=0", [](gpu::PrefillArgs& a) { a.nq = 0; }},
      {"kv_heads=0", [](gpu::PrefillArgs& a) { a.kv_heads = 0; }},
      {"q_heads=3", [](gpu::PrefillArgs& a) { a.q_heads = 3, a.kv_heads = 2; }},
      {"q_heads / kv_heads=16", [](gpu::PrefillArgs& a) { a.q_heads = 16; }},
      {"q_heads / kv_heads=3", [](gpu::PrefillArgs& a) { a.q_heads = 3, a.kv_heads = 1; }},
      {"arena.head_dim=96", [](gpu::PrefillArgs& a) { a.arena.head_dim = 96; }},
      {"arena.chunk_tokens=8", [](gpu::PrefillArgs& a) { a.arena.chunk_tokens = 8; }},
      {"arena.chunk_tokens=512", [](gpu::PrefillArgs& a) { a.arena.chunk_tokens = 512; }},
      {"arena.slot_bytes=1000", [](gpu::PrefillArgs& a) { a.arena.slot_bytes = 1000; }},
      {"arena.slot_bytes=16392", [](gpu::PrefillArgs& a) { a.arena.slot_bytes = 16384 + 8; }},
      {"arena.slots=0", [](gpu::PrefillArgs& a) { a.arena.slots = 0; }},
      {"scale", [](gpu::PrefillArgs& a) { a.scale = 0.f; }},
      {"scale", [](gpu::PrefillArgs& a) { a.scale = std::numeric_limits<float>::quiet_NaN(); }},
  };
  for (const Bad& b : bads) {
    gpu::PrefillArgs a = good;
    b.mutate(a);
    const Status st = gpu::prefill_attention(a, ctx.compute_stream());
    INFO(b.field, ": ", st.to_string());
    CHECK(st.code() == StatusCode::kInvalidArgument);
    CHECK(st.message().find(b.field) != std::string::npos);
  }
}

TEST_CASE("gemm: bf16 NT product of odd sizes against an fp64 dot") {
  gpu::CudaContext& ctx = test::cuda_context_or_skip();
  auto gen = test::rng(0x5eed06);
  auto made = gpu::Gemm::create();
  REQUIRE_MESSAGE(made.ok(), made.status().to_string());
  gpu::Gemm& gemm = **made;
  const uint32_t m = 37, n = 29, k = 83;
  const uint64_t lda = k + 5, ldb = k + 3, ldc = n + 7;
  const float alpha = 0.5f;
  const std::vector<bf16> a = test::random_bf16(m * lda, gen), b = test::random_bf16(n * ldb, gen);
  test::DeviceBuffer<bf16> d_a(ctx, a), d_b(ctx, b);
  test::DeviceBuffer<float> d_c(ctx, m * ldc);
  d_c.poison();
  const Status st = gemm.bf16_nt(d_a.get(), lda, d_b.get(), ldb, d_c.get(), ldc, m, n, k, alpha, ctx.compute_stream());
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  test::sync_or_fail(ctx);
  const std::vector<float> c = d_c.download();
  // Products of bf16 values are exact in fp32; only the fp32 sum rounds:
  // about k * 2^-24 of sum |a_i b_i| at worst.
  double worst = 0;
  size_t padding_written = 0;
  for (uint32_t i = 0; i < m; ++i) {
    for (uint32_t j = 0; j < ldc; ++j) {
      if (j >= n) {
        padding_written += !std::isnan(c[i * ldc + j]);
        continue;
      }
      double dot = 0, mag = 0;
      for (uint32_t t = 0; t < k; ++t) {
        const double x = double{a[i * lda + t].to_float()} * b[j * ldb + t].to_float();
        dot += x;
        mag += std::abs(x);
      }
      worst = std::max(worst, std::abs(c[i * ldc + j] - alpha * dot) / (alpha * mag));
    }
  }
  CHECK(worst <= 1e-5);
  CHECK_MESSAGE(padding_written == 0, "C's padding columns (j >= n) were written");

  const Status bad = gemm.bf16_nt(d_a.get(), k - 1, d_b.get(), ldb, d_c.get(), ldc, m, n, k, alpha, ctx.compute_stream());
  CHECK(bad.code() == StatusCode::kInvalidArgument);
  CHECK(bad.message().find("lda") != std::string::npos);
  const Status null_c = gemm.bf16_nt(d_a.get(), lda, d_b.get(), ldb, nullptr, ldc, m, n, k, alpha, ctx.compute_stream());
  CHECK(null_c.code() == StatusCode::kInvalidArgument);
}
