// CpuEngine against the single-threaded kernels and the fp64 reference: the
// parallel split (block ranges, per-head list ranges merged by log-sum-exp,
// top-k of a head ranked in pieces) must change nothing beyond rounding, on
// odd sizes and empty lists, on every ISA this CPU has, and the prefill GEMMs
// (oneDNN and our own) must match an fp64 GEMM.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "kvtier/cpu/engine.h"
#include "kvtier/cpu/reference.h"
#include "kvtier/cpu/topology.h"
#include "random.h"

using namespace kvtier;
using namespace kvtier::cpu;

namespace {

// What the kernels are held to against fp64 (kernels_test.cpp: bf16 products
// are exact in fp32, only the fp32 sums round); the split and the fp32 merge
// of its partial states must stay inside it.
constexpr double kAttendTolerance = 1e-5;
constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16};

std::unique_ptr<CpuEngine> make_engine(Isa isa, unsigned threads = 0, int numa_node = -1) {
  Result<std::unique_ptr<CpuEngine>> e = CpuEngine::create({threads, numa_node, isa, false});
  REQUIRE_MESSAGE(e.ok(), e.status().to_string());
  return std::move(e).value();
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : kAllIsas)
    if (isa_available(isa)) out.push_back(isa);
  return out;
}

// One layer's K and V, contiguous per KV head as the reference wants them,
// and the same tokens copied into stored blocks (K rows then V rows).
struct Layer {
  uint32_t q_heads, kv_heads, head_dim, chunk;
  uint64_t tokens;
  std::vector<bf16> q, k, v, arena;

  Layer(uint32_t qh, uint32_t kvh, uint32_t dim, uint64_t n, uint32_t chunk_tokens, std::mt19937_64& gen)
      : q_heads(qh), kv_heads(kvh), head_dim(dim), chunk(chunk_tokens), tokens(n),
        q(test::random_bf16(size_t{qh} * dim, gen, -2.f, 2.f)),
        k(test::random_bf16(kvh * n * dim, gen)),
        v(test::random_bf16(kvh * n * dim, gen)) {}

  uint32_t chunks() const { return static_cast<uint32_t>((tokens + chunk - 1) / chunk); }
  Bf16View<2> qv() const { return Bf16View<2>(q, {q_heads, head_dim}); }
  ref::LayerKv kv() const {
    return {Bf16View<3>(k, {kv_heads, tokens, head_dim}), Bf16View<3>(v, {kv_heads, tokens, head_dim})};
  }

  // Stored blocks for chunks[h] of each head; the pointers live as long as this Layer.
  std::vector<std::vector<HostBlock>> store(const std::vector<std::vector<uint32_t>>& chunks_of) {
    size_t blocks = 0;
    for (const auto& c : chunks_of) blocks += c.size();
    const size_t block_elems = size_t{2} * chunk * head_dim;
    arena.assign(blocks * block_elems, bf16::from_float(7.f));  // tail rows keep a value no kernel may read
    std::vector<std::vector<HostBlock>> out(kv_heads);
    size_t slot = 0;
    for (uint32_t h = 0; h < kv_heads; ++h)
      for (uint32_t c : chunks_of[h]) out[h].push_back(copy_block(h, c, arena.data() + slot++ * block_elems));
    return out;
  }

 private:
  HostBlock copy_block(uint32_t h, uint32_t c, bf16* dst) const {
    const uint64_t first = uint64_t{c} * chunk;
    const auto n = static_cast<uint32_t>(std::min<uint64_t>(chunk, tokens - first));
    const size_t src = (h * tokens + first) * head_dim, rows = size_t{n} * head_dim;
    std::copy_n(k.begin() + static_cast<ptrdiff_t>(src), rows, dst);
    std::copy_n(v.begin() + static_cast<ptrdiff_t>(src), rows, dst + size_t{chunk} * head_dim);
    return HostBlock{dst, n};
  }
};

// Random chunk lists: head h gets sizes[h] distinct chunks in random order.
std::vector<std::vector<uint32_t>> random_chunks(uint32_t chunks, const std::vector<uint32_t>& sizes,
                                                 std::mt19937_64& gen) {
  std::vector<std::vector<uint32_t>> out;
  for (uint32_t n : sizes) {
    std::vector<uint32_t> all(chunks);
    std::iota(all.begin(), all.end(), 0u);
    std::shuffle(all.begin(), all.end(), gen);
    all.resize(std::min(n, chunks));
    out.push_back(std::move(all));
  }
  return out;
}

// Largest |a - b| over o relative to max |b|, and largest |lse_a - lse_b|;
// an infinite lse (empty set) must match exactly, with o = 0.
struct Diff {
  double o_rel = 0, lse_abs = 0;
};

Diff diff(const PartialState& a, const PartialState64& b) {
  REQUIRE(a.o.size() == b.o.size());
  double scale = 1e-300;
  for (double x : b.o) scale = std::max(scale, std::abs(x));
  Diff d;
  for (size_t i = 0; i < a.o.size(); ++i) d.o_rel = std::max(d.o_rel, std::abs(a.o[i] - b.o[i]) / scale);
  for (size_t h = 0; h < b.lse.size(); ++h) {
    if (std::isinf(b.lse[h])) {
      CHECK(a.lse[h] == b.lse[h]);
      for (float x : a.o_row(static_cast<uint32_t>(h))) CHECK(x == 0.f);
      continue;
    }
    d.lse_abs = std::max(d.lse_abs, std::abs(a.lse[h] - b.lse[h]));
  }
  return d;
}

PartialState poisoned_state(uint32_t heads, uint32_t dim) {
  return {heads, dim, test::poisoned<float>(size_t{heads} * dim), test::poisoned<float>(heads)};
}

// A summary table of random mean keys (and values and token counts).
SummaryTable random_table(uint32_t kv_heads, uint32_t blocks, uint32_t dim, SummaryKind kind, std::mt19937_64& gen) {
  SummaryTable t(kv_heads, blocks, dim, kind);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_int_distribution<uint32_t> n(1, 64);
  for (uint32_t b = 0; b < blocks; ++b) t.tokens(b) = n(gen);
  for (uint32_t h = 0; h < kv_heads; ++h)
    for (uint32_t b = 0; b < blocks; ++b)
      for (uint32_t d = 0; d < dim; ++d) {
        if (kind == SummaryKind::kMeanBf16)
          t.kmean_bf16(h, b)[d] = bf16::from_float(u(gen));
        else
          t.kmean_f32(h, b)[d] = u(gen);
        if (kind == SummaryKind::kMinMaxF32) {
          t.kmin(h, b)[d] = t.kmean_f32(h, b)[d] - std::abs(u(gen));
          t.kmax(h, b)[d] = t.kmean_f32(h, b)[d] + std::abs(u(gen));
        }
        t.vmean(h, b)[d] = u(gen);
      }
  return t;
}

}  // namespace

TEST_CASE("engine: score over block ranges equals one kernel call over all blocks, bit for bit") {
  auto gen = test::rng(11);
  for (Isa isa : available_isas())
    for (SummaryKind kind : {SummaryKind::kMeanF32, SummaryKind::kMeanBf16, SummaryKind::kMinMaxF32})
      for (uint32_t blocks : {1u, 17u, 1000u, 4099u}) {
        CAPTURE(isa_name(isa));
        CAPTURE(static_cast<int>(kind));
        CAPTURE(blocks);
        const ScoreRule rule = kind == SummaryKind::kMinMaxF32 ? ScoreRule::kMinMaxBound : ScoreRule::kMaxDot;
        const SummaryTable table = random_table(8, blocks, 128, kind, gen);
        const std::vector<bf16> q = test::random_bf16(32 * 128, gen, -2.f, 2.f);
        const float scale = static_cast<float>(ref::default_scale(128));
        std::vector<float> want = test::poisoned<float>(size_t{8} * blocks), got = want;
        score_summaries(isa, Bf16View<2>(q, {32, 128}), table, scale, rule, 0, blocks,
                        MutF32View<2>(want, {8, blocks}));
        make_engine(isa)->score(Bf16View<2>(q, {32, 128}), table, scale, rule, MutF32View<2>(got, {8, blocks}));
        // Each block's score is computed alone, so splitting the range must not change a bit.
        for (size_t i = 0; i < got.size(); ++i) REQUIRE(got[i] == want[i]);
      }
}

TEST_CASE("engine: select equals select_topk per head") {
  auto gen = test::rng(12);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  for (uint32_t blocks : {1u, 17u, 16384u})
    for (uint32_t k : {0u, 1u, 64u, 20000u}) {
      CAPTURE(blocks);
      CAPTURE(k);
      std::vector<float> scores(size_t{8} * blocks);
      // Rounded scores make ties, which must break the same way.
      for (float& s : scores) s = std::round(u(gen) * 8.f) / 8.f;
      const F32View<2> view(scores, {8, blocks});
      const uint32_t far_begin = std::min(blocks, 2u), far_end = blocks > 66 ? blocks - 64 : blocks;
      std::vector<std::vector<uint32_t>> got;
      make_engine(best_isa())->select(view, k, far_begin, far_end, got);
      REQUIRE(got.size() == 8);
      for (uint32_t h = 0; h < 8; ++h) {
        std::vector<uint32_t> want;
        select_topk(view, h, k, far_begin, far_end, want);
        CHECK(got[h] == want);
      }
    }
}

TEST_CASE("engine: select with heads cut into pieces equals select_topk, ties and NaN included") {
  // Fewer KV heads than threads: each head's range is ranked in pieces and merged.
  auto gen = test::rng(18);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  auto engine = make_engine(best_isa());
  for (uint32_t heads : {1u, 2u})
    for (uint32_t blocks : {16384u, 40000u})
      for (uint32_t k : {0u, 1u, 64u, 3000u, 50000u}) {
        CAPTURE(heads);
        CAPTURE(blocks);
        CAPTURE(k);
        std::vector<float> scores(size_t{heads} * blocks);
        for (float& s : scores) s = std::round(u(gen) * 4.f) / 4.f;
        for (int i = 0; i < 20; ++i) scores[gen() % scores.size()] = std::numeric_limits<float>::quiet_NaN();
        const F32View<2> view(scores, {heads, blocks});
        std::vector<std::vector<uint32_t>> got;
        engine->select(view, k, 3, blocks - 5, got);
        REQUIRE(got.size() == heads);
        for (uint32_t h = 0; h < heads; ++h) {
          std::vector<uint32_t> want;
          select_topk(view, h, k, 3, blocks - 5, want);
          CHECK(got[h] == want);
        }
      }
}

TEST_CASE("engine: attend over split lists, merged, equals the fp64 reference") {
  auto gen = test::rng(13);
  for (Isa isa : available_isas())
    for (uint32_t group : {1u, 4u, 8u})
      for (uint32_t chunk : {16u, 64u}) {
        // Odd counts per head, one head with nothing, and a partial tail block.
        const std::vector<uint32_t> sizes = {1, 17, 0, 97};
        Layer layer(group * 4, 4, 128, 97ull * chunk + 5, chunk, gen);
        CAPTURE(isa_name(isa));
        CAPTURE(group);
        CAPTURE(chunk);
        const auto chunks = random_chunks(layer.chunks(), sizes, gen);
        const auto blocks = layer.store(chunks);
        const double scale = ref::default_scale(128);
        const PartialState64 want = ref::attend_blocks(layer.qv(), ref::blocks_of(layer.kv(), chunk, chunks), scale);
        PartialState got = poisoned_state(layer.q_heads, 128);
        make_engine(isa)->attend(layer.qv(), blocks, chunk, static_cast<float>(scale), got);
        const Diff d = diff(got, want);
        CHECK(d.o_rel < kAttendTolerance);
        CHECK(d.lse_abs < kAttendTolerance);
      }
}

TEST_CASE("engine: attend under keep_warm, before and after its release or time limit, equals fp64") {
  // The hold's spinners occupy the workers: work submitted meanwhile must
  // still finish (on the caller), and release or the limit must free them.
  auto gen = test::rng(15);
  Layer layer(8, 2, 64, 41ull * 16 + 3, 16, gen);
  const auto chunks = random_chunks(layer.chunks(), {23, 18}, gen);
  const auto blocks = layer.store(chunks);
  const double scale = ref::default_scale(64);
  const PartialState64 want = ref::attend_blocks(layer.qv(), ref::blocks_of(layer.kv(), 16, chunks), scale);
  const std::unique_ptr<CpuEngine> engine = make_engine(best_isa(), 2);
  const auto attend_ok = [&] {
    PartialState got = poisoned_state(layer.q_heads, 64);
    engine->attend(layer.qv(), blocks, 16, static_cast<float>(scale), got);
    const Diff d = diff(got, want);
    CHECK(d.o_rel < kAttendTolerance);
    CHECK(d.lse_abs < kAttendTolerance);
  };
  // Two pieces that each wait (up to 20 s) for the other to start: they only
  // finish in time if the worker is free to take one while the caller runs
  // the other, i.e. if no spinner still holds it.
  const auto worker_is_free = [&] {
    std::atomic<int> started{0};
    std::atomic<bool> met{true};
    engine->parallel_for(2, 1, [&](size_t, size_t) {
      ++started;
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (started.load() < 2)
        if (std::chrono::steady_clock::now() > until) {
          met = false;
          return;
        }
    });
    return met.load();
  };
  {
    CpuEngine::WarmHold hold = engine->keep_warm(std::chrono::seconds(60));
    attend_ok();  // while held: only the caller is free, and it is enough
    CpuEngine::WarmHold moved = std::move(hold);
    moved.release();
    moved.release();  // twice: no effect
    hold.release();   // moved-from: no effect
    CHECK(worker_is_free());  // released well before the 60 s limit
  }
  attend_ok();
  // Assigning over a live hold releases it.
  CpuEngine::WarmHold first = engine->keep_warm(std::chrono::seconds(60));
  first = CpuEngine::WarmHold();
  CHECK(worker_is_free());
  // Never released: the limit ends the spinning.
  CpuEngine::WarmHold held = engine->keep_warm(std::chrono::milliseconds(1));
  attend_ok();
  CHECK(worker_is_free());
  const std::unique_ptr<CpuEngine> single = make_engine(best_isa(), 1);
  CpuEngine::WarmHold none = single->keep_warm(std::chrono::milliseconds(200));  // one thread: nothing to keep warm
  PartialState got = poisoned_state(layer.q_heads, 64);
  single->attend(layer.qv(), blocks, 16, static_cast<float>(scale), got);
  CHECK(diff(got, want).o_rel < kAttendTolerance);
}

TEST_CASE("engine: attend with every list empty gives (0, -inf)") {
  auto gen = test::rng(14);
  const std::vector<bf16> q = test::random_bf16(32 * 128, gen);
  const std::vector<std::vector<HostBlock>> none(8);
  PartialState got = poisoned_state(32, 128);
  make_engine(best_isa())->attend(Bf16View<2>(q, {32, 128}), none, 64, 0.1f, got);
  for (float x : got.o) CHECK(x == 0.f);
  for (float l : got.lse) CHECK(l == -std::numeric_limits<float>::infinity());
}

TEST_CASE("engine: build_summaries equals build_summary per block, far_field equals fp64") {
  auto gen = test::rng(15);
  for (Isa isa : available_isas()) {
    CAPTURE(isa_name(isa));
    Layer layer(32, 8, 128, 300ull * 64 + 13, 64, gen);
    std::vector<std::vector<uint32_t>> all(8, std::vector<uint32_t>(layer.chunks()));
    for (auto& l : all) std::iota(l.begin(), l.end(), 0u);
    const auto blocks = layer.store(all);
    auto engine = make_engine(isa);
    SummaryTable got(8, layer.chunks(), 128, SummaryKind::kMeanF32), want = got;
    engine->build_summaries(blocks, 64, got);
    for (uint32_t h = 0; h < 8; ++h)
      for (uint32_t b = 0; b < layer.chunks(); ++b) build_summary(isa, blocks[h][b], 64, want, h, b);
    for (uint32_t h = 0; h < 8; ++h)
      for (uint32_t b = 0; b < layer.chunks(); ++b) {
        REQUIRE(std::equal(got.kmean_f32(h, b), got.kmean_f32(h, b) + 128, want.kmean_f32(h, b)));
        REQUIRE(std::equal(got.vmean(h, b), got.vmean(h, b) + 128, want.vmean(h, b)));
        REQUIRE(got.tokens(b) == want.tokens(b));
      }

    // Far field over odd lists (one empty): one pseudo-token per block with
    // score scale * q . kmean + ln(tokens) and value vmean, in fp64.
    const auto far = random_chunks(layer.chunks(), {1, 17, 0, 97, 5, 3, 299, 2}, gen);
    const double scale = ref::default_scale(128);
    PartialState64 ref64 = PartialState64::empty(32, 128);
    for (uint32_t qh = 0; qh < 32; ++qh) {
      const uint32_t h = qh / 4;
      if (far[h].empty()) continue;
      std::vector<double> s;
      for (uint32_t b : far[h]) {
        double dot = 0;
        for (uint32_t d = 0; d < 128; ++d) dot += double(layer.q[qh * 128 + d].to_float()) * got.kmean_f32(h, b)[d];
        s.push_back(scale * dot + std::log(double(got.tokens(b))));
      }
      const double m = *std::max_element(s.begin(), s.end());
      double l = 0;
      for (size_t i = 0; i < s.size(); ++i) {
        const double w = std::exp(s[i] - m);
        l += w;
        for (uint32_t d = 0; d < 128; ++d) ref64.o[qh * 128 + d] += w * got.vmean(h, far[h][i])[d];
      }
      for (uint32_t d = 0; d < 128; ++d) ref64.o[qh * 128 + d] /= l;
      ref64.lse[qh] = m + std::log(l);
    }
    PartialState ff = poisoned_state(32, 128);
    engine->far_field(layer.qv(), got, far, static_cast<float>(scale), ff);
    const Diff d = diff(ff, ref64);
    CHECK(d.o_rel < kAttendTolerance);
    CHECK(d.lse_abs < kAttendTolerance);
  }
}

namespace {

// Checks scores [m][n] against an fp64 GEMM, each element within fp32
// accumulation error of the sum of |products| (the bf16 products are exact).
void check_gemm(const std::vector<bf16>& q, const std::vector<bf16>& kmean, const std::vector<float>& scores,
                uint32_t m, uint32_t n, uint32_t k) {
  for (uint32_t i = 0; i < m; ++i)
    for (uint32_t j = 0; j < n; ++j) {
      double dot = 0, mag = 0;
      for (uint32_t d = 0; d < k; ++d) {
        const double p = double(q[size_t{i} * k + d].to_float()) * kmean[size_t{j} * k + d].to_float();
        dot += p;
        mag += std::abs(p);
      }
      const float got = scores[size_t{i} * n + j];
      if (!(std::abs(got - dot) <= 1e-5 * mag + 1e-30)) {
        CAPTURE(i);
        CAPTURE(j);
        FAIL_CHECK("score ", got, " vs fp64 ", dot, " (sum of |products| ", mag, ")");
        return;
      }
    }
}

}  // namespace

TEST_CASE("engine: prefill scoring, oneDNN and own, equals an fp64 GEMM on odd sizes") {
  auto gen = test::rng(16);
  auto onednn = make_engine(best_isa());
  for (uint32_t m : {1u, 17u, 257u})
    for (uint32_t n : {1u, 1000u})
      for (uint32_t k : {33u, 64u, 128u}) {
        CAPTURE(m);
        CAPTURE(n);
        CAPTURE(k);
        const std::vector<bf16> q = test::random_bf16(size_t{m} * k, gen, -2.f, 2.f);
        const std::vector<bf16> kmean = test::random_bf16(size_t{n} * k, gen);
        const Bf16View<2> qv(q, {m, k}), kv(kmean, {n, k});
        std::vector<float> scores = test::poisoned<float>(size_t{m} * n);
        const Status st = onednn->prefill_scores_onednn(qv, kv, MutF32View<2>(scores, {m, n}));
        REQUIRE_MESSAGE(st.ok(), st.to_string());
        check_gemm(q, kmean, scores, m, n, k);
        for (Isa isa : available_isas()) {
          CAPTURE(isa_name(isa));
          scores = test::poisoned<float>(size_t{m} * n);
          make_engine(isa)->prefill_scores_own(qv, kv, MutF32View<2>(scores, {m, n}));
          check_gemm(q, kmean, scores, m, n, k);
        }
      }
}

TEST_CASE("engine: prefill_scores_onednn reports mismatched shapes") {
  std::vector<bf16> q(4 * 64), kmean(8 * 32);
  std::vector<float> scores(4 * 8);
  const Status st = make_engine(best_isa())->prefill_scores_onednn(
      Bf16View<2>(q, {4, 64}), Bf16View<2>(kmean, {8, 32}), MutF32View<2>(scores, {4, 8}));
  CHECK(st.code() == StatusCode::kInvalidArgument);
  CHECK(st.message().find("kmean [8][32]") != std::string::npos);
}

TEST_CASE("engine: bad thread counts, NUMA nodes and ISAs are reported, describe() names the threads") {
  const Result<Topology> topo = load_topology();
  REQUIRE(topo.ok());
  const uint32_t cores = topo->cores;
  auto too_many = CpuEngine::create({cores + 1, -1, Isa::kScalar, true});
  REQUIRE_FALSE(too_many.ok());
  CHECK(too_many.status().code() == StatusCode::kInvalidArgument);
  CHECK(too_many.status().message().find("threads=" + std::to_string(cores + 1)) != std::string::npos);
  CHECK(too_many.status().message().find(std::to_string(cores) + " cores") != std::string::npos);

  auto no_node = CpuEngine::create({0, 4096, Isa::kScalar, true});
  REQUIRE_FALSE(no_node.ok());
  CHECK(no_node.status().message().find("numa_node=4096") != std::string::npos);

  for (Isa isa : kAllIsas) {
    if (isa_available(isa)) continue;
    auto e = CpuEngine::create({1, -1, isa, false});
    REQUIRE_FALSE(e.ok());
    CHECK(e.status().code() == StatusCode::kUnavailable);
    CHECK(e.status().message().find(std::string(isa_name(isa))) != std::string::npos);
  }

  auto engine = make_engine(best_isa(), 1);
  CHECK(engine->threads() == 1);
  CHECK(engine->describe().find("1 threads") != std::string::npos);
  auto all = CpuEngine::create({0, -1, Isa::kScalar, true});
  REQUIRE(all.ok());
  CHECK((*all)->threads() == cores);
  CHECK((*all)->isa() == best_isa());
  CHECK((*all)->describe().find(std::to_string(cores) + " threads") != std::string::npos);
}

TEST_CASE("engine: threads bound to a NUMA node compute what unbound threads compute") {
  const Result<Topology> topo = load_topology();
  REQUIRE(topo.ok());
  REQUIRE(!topo->numa_nodes.empty());
  const int node = static_cast<int>(topo->numa_nodes[0].os_index);
  auto gen = test::rng(17);
  Layer layer(32, 8, 128, 64ull * 200, 64, gen);
  const auto chunks = random_chunks(layer.chunks(), std::vector<uint32_t>(8, 150), gen);
  const auto blocks = layer.store(chunks);
  auto bound = make_engine(best_isa(), 0, node);
  auto unbound = make_engine(best_isa(), bound->threads());
  CHECK(bound->describe().find("NUMA node " + std::to_string(node)) != std::string::npos);
  PartialState a = poisoned_state(32, 128), b = poisoned_state(32, 128);
  bound->attend(layer.qv(), blocks, 64, 0.1f, a);
  unbound->attend(layer.qv(), blocks, 64, 0.1f, b);
  CHECK(a.o == b.o);
  CHECK(a.lse == b.lse);
  // oneDNN's OpenMP team is bound to the same cores on a node engine.
  const std::vector<bf16> kmean = test::random_bf16(size_t{500} * 128, gen);
  std::vector<float> s1(32 * 500), s2(32 * 500);
  REQUIRE(bound->prefill_scores_onednn(layer.qv(), Bf16View<2>(kmean, {500, 128}), MutF32View<2>(s1, {32, 500})).ok());
  bound->prefill_scores_own(layer.qv(), Bf16View<2>(kmean, {500, 128}), MutF32View<2>(s2, {32, 500}));
  check_gemm(layer.q, kmean, s1, 32, 500, 128);
  check_gemm(layer.q, kmean, s2, 32, 500, 128);
}
