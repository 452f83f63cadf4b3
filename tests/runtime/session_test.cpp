// Sessions end to end on a small shape whose budgets force all three tiers:
// prefill and decode against the fp64 reference, batches, save/open, late
// blocks, corruption and bad input. Built twice: with the CPU backend (label
// cpu) and with the CUDA backend (label gpu, skipped without a GPU).
#include <doctest/doctest.h>

#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <vector>

#include "kvtier/core/block.h"
#include "kvtier/cpu/kernels.h"
#include "kvtier/cpu/reference.h"
#include "kvtier/runtime/session.h"
#include "kvtier/runtime/synthetic_model.h"
#include "kvtier/storage/block_file.h"
#include "skip.h"
#include "temp_dir.h"

using namespace kvtier;
using namespace kvtier::runtime;

namespace {

#ifdef KVT_SESSION_TEST_CUDA
constexpr DeviceChoice kDevice = DeviceChoice::kCuda;
#else
constexpr DeviceChoice kDevice = DeviceChoice::kCpu;
#endif

ModelShape shape() {
  ModelShape s;
  s.layers = 2;
  s.q_heads = 8;
  s.kv_heads = 2;
  s.head_dim = 64;
  return s;
}

SparsityPolicy policy(uint32_t topk) {
  SparsityPolicy p;
  p.chunk_tokens = 16;
  p.sink_tokens = 16;
  p.window_tokens = 64;
  p.topk_chunks = topk;
  return p;
}

// Blocks of 16 x 64 x 2 x 2 = 4 KiB. The gpu tier holds 256 slots shared by
// `sessions`: each needs 4 tails and 24 sink/window slots, and a full-budget
// prefill wants 250 blocks of a layer at once, so it runs in passes; host
// 512 KiB = 64 staging + 64 home slots for 2 x 2 x 125 blocks, so most homes
// are on NVMe.
EngineOptions options(const std::filesystem::path& dir, uint32_t topk, uint32_t sessions = 1) {
  EngineOptions o;
  o.shape = shape();
  o.policy = policy(topk);
  o.gpu_bytes = 256 * 4096;
  o.max_sessions = sessions;
  o.host_bytes = 128 * 4096;
  o.nvme_dir = dir;
  o.device = kDevice;
  o.cpu_threads = 2;
  return o;
}

std::unique_ptr<Engine> make_engine(const EngineOptions& o) {
  Result<std::unique_ptr<Engine>> e = Engine::create(o);
  if (kDevice == DeviceChoice::kCuda)
    test::require(e.ok() || e.status().code() != StatusCode::kUnavailable, e.status().to_string());
  REQUIRE_MESSAGE(e.ok(), e.status().to_string());
  return std::move(e).value();
}

SyntheticModel model(uint64_t context, uint64_t seed) {
  SyntheticModelOptions mo;
  mo.shape = shape();
  mo.context_tokens = context;
  mo.seed = seed;
  mo.hidden = 32;
  Result<SyntheticModel> m = SyntheticModel::create(mo);
  REQUIRE(m.ok());
  return std::move(m).value();
}

// Prefills `tokens` in blocks of `block`, every layer; returns the outputs of
// layer 0 ([tokens][q_heads][head_dim]) when asked.
void prefill(Session& s, const SyntheticModel& m, uint64_t tokens, uint32_t block, std::vector<float>* out0) {
  const ModelShape sh = shape();
  const size_t qrow = size_t{sh.q_heads} * sh.head_dim, kvrow = size_t{sh.kv_heads} * sh.head_dim;
  if (out0 != nullptr) out0->assign(tokens * qrow, std::nanf(""));
  for (uint64_t t = 0; t < tokens; t += block) {
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(block, tokens - t));
    for (uint32_t l = 0; l < sh.layers; ++l) {
      std::vector<bf16> q(n * qrow), k(n * kvrow), v(n * kvrow);
      m.kv(l, t, n, k, v);
      m.prefill_query(l, t, n, q);
      std::span<float> out;
      if (out0 != nullptr && l == 0) out = std::span<float>(*out0).subspan(t * qrow, n * qrow);
      const Status st = s.prefill(l, t, n, q, k, v, out);
      REQUIRE_MESSAGE(st.ok(), st.to_string());
    }
  }
}

struct StepIo {
  std::vector<std::vector<bf16>> q;     // [layer]
  std::vector<std::vector<float>> out;  // [layer]
};

// One decode step of every layer for one session; returns q and out per layer.
StepIo decode(Session& s, const SyntheticModel& m, uint64_t step, Status* failure = nullptr) {
  const ModelShape sh = shape();
  const size_t qrow = size_t{sh.q_heads} * sh.head_dim, kvrow = size_t{sh.kv_heads} * sh.head_dim;
  StepIo io;
  for (uint32_t l = 0; l < sh.layers; ++l) {
    std::vector<bf16> q(qrow), k(kvrow), v(kvrow);
    std::vector<float> out(qrow, std::nanf(""));
    m.decode_query(l, step, q);
    m.kv(l, s.tokens(l), 1, k, v);
    const Status st = s.decode_step(l, q, k, v, out);
    if (failure != nullptr && !st.ok()) {
      *failure = st;
      return io;
    }
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    io.q.push_back(q);
    io.out.push_back(out);
  }
  return io;
}

// K and V of tokens [0, tokens) of a layer, laid out per KV head as the
// reference reads them ([kv_heads][tokens][head_dim]).
struct LayerData {
  std::vector<bf16> k, v;
  cpu::ref::LayerKv view(uint64_t tokens) const {
    const ModelShape sh = shape();
    return {Bf16View<3>(k, {sh.kv_heads, tokens, sh.head_dim}), Bf16View<3>(v, {sh.kv_heads, tokens, sh.head_dim})};
  }
};

LayerData layer_data(const SyntheticModel& m, uint32_t layer, uint64_t tokens) {
  const ModelShape sh = shape();
  std::vector<bf16> k(tokens * sh.kv_heads * sh.head_dim), v(k.size());
  m.kv(layer, 0, tokens, k, v);
  LayerData out{std::vector<bf16>(k.size()), std::vector<bf16>(v.size())};
  for (uint64_t t = 0; t < tokens; ++t)
    for (uint32_t h = 0; h < sh.kv_heads; ++h)
      for (uint32_t d = 0; d < sh.head_dim; ++d) {
        out.k[(h * tokens + t) * sh.head_dim + d] = k[(t * sh.kv_heads + h) * sh.head_dim + d];
        out.v[(h * tokens + t) * sh.head_dim + d] = v[(t * sh.kv_heads + h) * sh.head_dim + d];
      }
  return out;
}

// Dense fp64 attention of one query over tokens [0, tokens) of a layer.
cpu::PartialState64 dense(const SyntheticModel& m, uint32_t layer, uint64_t tokens, std::span<const bf16> q) {
  const ModelShape sh = shape();
  const LayerData data = layer_data(m, layer, tokens);
  return cpu::ref::dense_attention(Bf16View<2>(q, {sh.q_heads, sh.head_dim}), data.view(tokens),
                                   cpu::ref::default_scale(sh.head_dim));
}

// Exact fp64 attention of one query over just the chunks[kv_head] of a layer
// holding `tokens` tokens: what a sparse step must equal to rounding.
cpu::PartialState64 exact_over(const SyntheticModel& m, uint32_t layer, uint64_t tokens,
                               const std::vector<std::vector<uint32_t>>& chunks, std::span<const bf16> q) {
  const ModelShape sh = shape();
  const LayerData data = layer_data(m, layer, tokens);
  return cpu::ref::attend_blocks(Bf16View<2>(q, {sh.q_heads, sh.head_dim}),
                                 cpu::ref::blocks_of(data.view(tokens), policy(0).chunk_tokens, chunks),
                                 cpu::ref::default_scale(sh.head_dim));
}

double rel_error(std::span<const float> got, std::span<const double> want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    REQUIRE(std::isfinite(got[i]));
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

constexpr uint64_t kContext = 2000;  // 125 chunks: 1 sink, 4-5 window, the rest far
constexpr uint32_t kAll = 200;       // top-k covering every far chunk

}  // namespace

// With fetch_read_ahead off, fetches read NVMe-only blocks inside their
// upload requests, as before it: the same results either way.
TEST_CASE("full budget: prefill and decode over three tiers equal dense attention to rounding") {
  for (const bool read_ahead : {true, false}) {
    CAPTURE(read_ahead);
    test::TempDir dir("kvt-session");
    EngineOptions o = options(dir.path(), kAll);
    o.fetch_read_ahead = read_ahead;
    auto engine = make_engine(o);
    auto session = engine->create_session(kContext + 24, "a");
    REQUIRE_MESSAGE(session.ok(), session.status().to_string());
    Session& s = **session;
    const SyntheticModel m = model(kContext, 7);
    std::vector<float> out0;
    prefill(s, m, kContext, 300, &out0);  // blocks not aligned to chunks
    CHECK(s.tokens() == kContext);
    const scheduler::Placement pl = s.placement();
    CHECK(pl.host_home_bytes > 0);
    CHECK(pl.nvme_home_bytes > pl.host_home_bytes);
    CHECK(pl.gpu_cached_bytes > 0);
    {  // every NVMe-homed block went home once, in prefill's timed writes
      const scheduler::ExecutorStats st = engine->stats();
      const uint64_t block_bytes = BlockGeometry(shape(), policy(kAll).chunk_tokens).block_bytes();
      CHECK(st.prefill_home_write_nvme_blocks * block_bytes == pl.nvme_home_bytes);
      CHECK(st.prefill_home_write_us > 0);
      // Its parts: copies and file writes, each within the land time.
      CHECK(st.prefill_home_write_copy_us > 0);
      CHECK(st.prefill_home_write_file_us > 0);
      CHECK(st.prefill_home_write_copy_us + st.prefill_home_write_file_us <= st.prefill_home_write_us);
      // With every chunk selected, query p attends keys 0..p: the pairs over
      // all layers and q heads are those of dense causal attention, in passes.
      const ModelShape sh = shape();
      CHECK(st.prefill_attention_pairs == uint64_t{sh.layers} * sh.q_heads * kContext * (kContext + 1) / 2);
      CHECK(st.prefill_attention_us > 0);
      // Prefill's passes fetch selected blocks whose homes are on NVMe.
      CHECK((st.fetch_read_ahead_blocks > 0) == read_ahead);
    }
    // Prefill outputs at odd positions: causal dense over [0, pos].
    const ModelShape sh = shape();
    const size_t qrow = size_t{sh.q_heads} * sh.head_dim;
    for (uint64_t pos : {0ull, 1ull, 15ull, 16ull, 299ull, 300ull, 1023ull, 1999ull}) {
      std::vector<bf16> q(qrow);
      std::vector<bf16> all(kContext * qrow);
      m.prefill_query(0, pos, 1, q);
      const cpu::PartialState64 want = dense(m, 0, pos + 1, q);
      CAPTURE(pos);
      // The GPU prefill kernel rounds P to bf16 for P.V (as FlashAttention does):
      // about 2^-9 relative; the CPU path keeps fp32 throughout.
      const double tol = kDevice == DeviceChoice::kCuda ? 2e-3 : 1e-5;
      CHECK(rel_error(std::span<const float>(out0).subspan(pos * qrow, qrow), want.o) < tol);
    }
    // Decode steps, every layer, against dense over the whole context. 20
    // steps move the window's start past a chunk boundary (token 1952), so the
    // chunk that leaves it stops being hot and is selected like any far block.
    for (uint64_t step = 0; step < 20; ++step) {
      const StepIo io = decode(s, m, step);
      for (uint32_t l = 0; l < sh.layers; ++l) {
        const cpu::PartialState64 want = dense(m, l, s.tokens(l), io.q[l]);
        CAPTURE(step);
        CAPTURE(l);
        CHECK(rel_error(io.out[l], want.o) < 1e-5);
        Result<cpu::FidelityReport> f = s.verify_last_step(l, io.q[l], io.out[l]);
        REQUIRE_MESSAGE(f.ok(), f.status().to_string());
        CHECK(f->rel_error < 1e-5);
        CHECK(f->mass_recall_min > 1 - 1e-12);
      }
    }
    const scheduler::ExecutorStats st = engine->stats();
    CHECK(st.nvme_read_blocks > 0);  // selected blocks came from every tier
    CHECK(st.cpu_blocks + st.uploaded_blocks + st.gpu_resident_blocks == st.selected_blocks);
  }
}

TEST_CASE("with room in staging, prefill reads every NVMe-only block it fetches ahead of its uploads") {
  test::TempDir dir("kvt-session");
  EngineOptions o = options(dir.path(), kAll);
  o.host_bytes = 512 * 4096;        // 448 staging slots (read-ahead requests of up to 224), 64 host homes
  o.host_cache_bytes = 448 * 4096;
  auto engine = make_engine(o);
  auto session = engine->create_session(kContext, "a");
  REQUIRE_MESSAGE(session.ok(), session.status().to_string());
  prefill(**session, model(kContext, 7), kContext, 300, nullptr);
  const scheduler::ExecutorStats st = engine->stats();
  // Some passes fetch more than 32 NVMe-only blocks; all go in one request.
  CHECK(st.prefill_fetch_nvme_reads > 0);
  CHECK(st.fetch_read_ahead_blocks == st.prefill_fetch_nvme_reads);
}

TEST_CASE("sparse budget: selection, fidelity report and a batch that equals sessions alone") {
  test::TempDir dir("kvt-session");
  auto engine = make_engine(options(dir.path(), 8, 4));
  std::vector<std::unique_ptr<Session>> ss;
  std::vector<SyntheticModel> ms;
  const uint64_t contexts[3] = {kContext, 1500, 777};
  for (int i = 0; i < 3; ++i) {
    auto s = engine->create_session(kContext + 8, std::string("b").append(std::to_string(i)));
    REQUIRE_MESSAGE(s.ok(), s.status().to_string());
    ms.push_back(model(contexts[i], 11 + i));
    prefill(**s, ms.back(), contexts[i], 512, nullptr);
    ss.push_back(std::move(s).value());
  }
  // A twin of session 0, decoded alone.
  auto twin = engine->create_session(kContext + 8, "twin");
  REQUIRE(twin.ok());
  prefill(**twin, ms[0], contexts[0], 512, nullptr);
  const ModelShape sh = shape();
  const size_t qrow = size_t{sh.q_heads} * sh.head_dim, kvrow = size_t{sh.kv_heads} * sh.head_dim;
  for (uint64_t step = 0; step < 3; ++step) {
    const StepIo alone = decode(**twin, ms[0], step);
    std::vector<std::vector<float>> outs(3, std::vector<float>(qrow, std::nanf("")));
    for (uint32_t l = 0; l < sh.layers; ++l) {
      std::vector<std::vector<bf16>> q(3, std::vector<bf16>(qrow)), k(3, std::vector<bf16>(kvrow)), v(3, std::vector<bf16>(kvrow));
      std::vector<DecodeRequest> batch;
      for (int i = 0; i < 3; ++i) {
        ms[i].decode_query(l, step, q[i]);
        ms[i].kv(l, ss[i]->tokens(l), 1, k[i], v[i]);
        batch.push_back({ss[i].get(), q[i], k[i], v[i], outs[i]});
      }
      const Status st = engine->decode_layer(l, batch);
      REQUIRE_MESSAGE(st.ok(), st.to_string());
      // Sequence 0 of the batch = the twin alone (same selection, same blocks).
      for (size_t j = 0; j < qrow; ++j) REQUIRE(std::fabs(outs[0][j] - alone.out[l][j]) <= 1e-5f * (1 + std::fabs(alone.out[l][j])));
      CHECK(ss[0]->last_selection(l) == (*twin)->last_selection(l));
      for (int i = 0; i < 3; ++i) {
        Result<cpu::FidelityReport> f = ss[i]->verify_last_step(l, q[i], outs[i]);
        REQUIRE_MESSAGE(f.ok(), f.status().to_string());
        // The step equals exact attention over the chunks it says it attended,
        // wherever they were (GPU slots, uploads, host RAM, NVMe).
        CHECK(ss[i]->kv().last_attended(l).far_field[0].empty());
        CHECK(rel_error(outs[i], exact_over(ms[i], l, ss[i]->tokens(l), ss[i]->kv().last_attended(l).chunks, q[i]).o) <
              1e-5);
        CHECK(f->mass_recall_mean > 0.0);
        CHECK(f->mass_recall_mean <= 1.0 + 1e-12);
        for (uint32_t h = 0; h < sh.kv_heads; ++h) CHECK(ss[i]->last_selection(l)[h].size() == 8);
      }
    }
  }
}

TEST_CASE("the selection kept from the last step is counted per head, by hand") {
  test::TempDir dir("kvt-session");
  auto engine = make_engine(options(dir.path(), 8, 4));
  auto s = engine->create_session(kContext + 8, "kept");
  REQUIRE_MESSAGE(s.ok(), s.status().to_string());
  const SyntheticModel m = model(kContext, 23);
  prefill(**s, m, kContext, 512, nullptr);
  engine->reset_stats();
  const ModelShape sh = shape();
  const size_t qrow = size_t{sh.q_heads} * sh.head_dim, kvrow = size_t{sh.kv_heads} * sh.head_dim;
  uint64_t kept = 0, compared = 0;
  for (uint64_t step = 0; step < 4; ++step)
    for (uint32_t l = 0; l < sh.layers; ++l) {
      const std::vector<std::vector<uint32_t>> before = (*s)->last_selection(l);
      std::vector<bf16> q(qrow), k(kvrow), v(kvrow);
      std::vector<float> out(qrow);
      m.decode_query(l, step, q);
      m.kv(l, (*s)->tokens(l), 1, k, v);
      REQUIRE((*s)->decode_step(l, q, k, v, out).ok());
      const std::vector<std::vector<uint32_t>>& now = (*s)->last_selection(l);
      for (uint32_t h = 0; h < sh.kv_heads; ++h) {
        if (before[h].empty()) continue;
        compared += now[h].size();
        for (uint32_t c : now[h]) kept += std::count(before[h].begin(), before[h].end(), c);
      }
    }
  const scheduler::ExecutorStats st = engine->stats();
  CHECK(compared == uint64_t{3} * sh.layers * sh.kv_heads * 8);  // steps 1-3, 8 blocks a head
  CHECK(st.selection_compared == compared);
  CHECK(st.kept_from_previous == kept);
  CHECK(kept > 0);          // correlated queries keep some blocks
  CHECK(kept < compared);   // and change some
}

#ifdef KVT_SESSION_TEST_CUDA
// ExecutorOptions::score_on_gpu: the GPU scores the mirrored mean keys and the
// CPU picks the top-k from those scores. Each selection must be a top-k of
// the CPU scorer's own scores up to fp32 summation order (a block the CPU
// ranks below its k-th best by more than rounding would be a wrong score),
// and where the selections agree the outputs equal those of an engine whose
// CPU scores.
TEST_CASE("summaries scored on the GPU select the CPU scorer's top-k") {
  test::TempDir dir("kvt-session");
  const SyntheticModel m = model(kContext, 21);
  EngineOptions on = options(dir.path(), 8), off = options(dir.path(), 8);
  off.score_on_gpu = false;
  auto eg = make_engine(on);
  auto ec = make_engine(off);
  auto sg = eg->create_session(kContext + 8, "gpu-scored");
  auto sc = ec->create_session(kContext + 8, "cpu-scored");
  REQUIRE(sg.ok());
  REQUIRE(sc.ok());
  prefill(**sg, m, kContext, 400, nullptr);
  prefill(**sc, m, kContext, 400, nullptr);
  const ModelShape sh = shape();
  const uint32_t k = policy(8).topk_chunks;
  uint64_t same = 0, compared = 0;
  for (uint64_t step = 0; step < 3; ++step) {
    const StepIo g = decode(**sg, m, step);
    const StepIo c = decode(**sc, m, step);
    for (uint32_t l = 0; l < sh.layers; ++l) {
      const cpu::SummaryTable& table = (*sg)->kv().summaries(l);
      std::vector<float> scores(size_t{sh.kv_heads} * table.blocks());
      cpu::score_summaries(cpu::best_isa(), Bf16View<2>(g.q[l], {sh.q_heads, sh.head_dim}), table,
                           static_cast<float>(cpu::ref::default_scale(sh.head_dim)), cpu::ScoreRule::kMaxDot, 0,
                           table.blocks(), MutF32View<2>(scores, {sh.kv_heads, table.blocks()}));
      const std::vector<std::vector<uint32_t>>& want = (*sc)->last_selection(l);
      for (uint32_t h = 0; h < sh.kv_heads; ++h) {
        const std::vector<uint32_t>& got = (*sg)->last_selection(l)[h];
        REQUIRE(got.size() == k);
        REQUIRE(want[h].size() == k);
        // The CPU's k-th best score among the blocks it chose.
        float kth = INFINITY;
        for (uint32_t b : want[h]) kth = std::min(kth, scores[h * table.blocks() + b]);
        for (uint32_t b : got) CHECK(scores[h * table.blocks() + b] >= kth - 1e-4f * (1 + std::fabs(kth)));
        ++compared;
        same += got == want[h];
      }
      if ((*sg)->last_selection(l) == want)
        for (size_t j = 0; j < g.out[l].size(); ++j)
          REQUIRE(std::fabs(g.out[l][j] - c.out[l][j]) <= 1e-5f * (1 + std::fabs(c.out[l][j])));
    }
  }
  // The GPU really scored every layer step of its engine, and the CPU all of the other's.
  CHECK(eg->stats().gpu_scored == 3 * sh.layers);
  CHECK(ec->stats().gpu_scored == 0);
  // Random summaries leave no near-ties at the k-th place in practice.
  CHECK(same == compared);
}
#endif

TEST_CASE("save and open: a later engine decodes the saved context without re-prefill") {
  test::TempDir dir("kvt-session");
  const SyntheticModel m = model(kContext, 5);
  StepIo first;
  std::filesystem::path file;
  {
    auto engine = make_engine(options(dir.path(), 8, 2));
    auto s = engine->create_session(kContext + 8, "saved");
    REQUIRE(s.ok());
    prefill(**s, m, kContext, 400, nullptr);
    const Status st = (*s)->save();
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    file = (*s)->path();
    // The step a reopened session must reproduce.
    auto twin = engine->create_session(kContext + 8, "twin");
    REQUIRE(twin.ok());
    prefill(**twin, m, kContext, 400, nullptr);
    first = decode(**twin, m, 0);
  }
  auto engine = make_engine(options(dir.path(), 8));
  auto s = engine->open_session(file);
  REQUIRE_MESSAGE(s.ok(), s.status().to_string());
  CHECK((*s)->tokens() == kContext);
  const StepIo again = decode(**s, m, 0);
  for (uint32_t l = 0; l < shape().layers; ++l)
    for (size_t j = 0; j < again.out[l].size(); ++j)
      REQUIRE(std::fabs(again.out[l][j] - first.out[l][j]) <= 1e-5f * (1 + std::fabs(first.out[l][j])));

  SUBCASE("a session file from another shape is refused, naming both") {
    EngineOptions other = options(dir.path(), 8);
    other.shape.q_heads = 4;
    auto e2 = make_engine(other);
    auto bad = e2->open_session(file);
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.status().message().find("another shape") != std::string::npos);
    CHECK(bad.status().message().find("q_heads=8") != std::string::npos);
    CHECK(bad.status().message().find("q_heads=4") != std::string::npos);
  }
  SUBCASE("a damaged sidecar is refused") {
    s->reset();
    {
      std::fstream f(file.string() + ".meta", std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(200);
      f.put('\x5a');
    }
    auto bad = engine->open_session(file);
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.status().code() == StatusCode::kCorrupt);
  }
}

TEST_CASE("late blocks under the summary policy are counted, attended by summary, and read for later steps") {
  test::TempDir dir("kvt-session");
  EngineOptions o = options(dir.path(), 16);
  o.late = scheduler::LatePolicy::kSummary;
  scheduler::CostRates slow;
  slow.gpu_attend_gbps = slow.cpu_attend_gbps = slow.cpu_score_gbps = slow.cpu_topk_gbps = slow.h2d_gbps =
      slow.d2h_gbps = 10;
  slow.nvme_read_gbps = slow.nvme_write_gbps = 1e-6;  // every NVMe read is late
  slow.nvme_latency_us = 1e6;
  slow.launch_us = 1;
  o.rates = slow;
  auto engine = make_engine(o);
  auto s = engine->create_session(kContext + 8, "late");
  REQUIRE(s.ok());
  const SyntheticModel m = model(kContext, 3);
  prefill(**s, m, kContext, 500, nullptr);
  engine->reset_stats();
  const StepIo io = decode(**s, m, 0);
  const scheduler::ExecutorStats st = engine->stats();
  CHECK(st.late_blocks > 0);
  for (uint32_t l = 0; l < shape().layers; ++l) {
    Result<cpu::FidelityReport> f = (*s)->verify_last_step(l, io.q[l], io.out[l]);
    REQUIRE(f.ok());
    CHECK(f->rel_error < 1.0);
    CHECK((*s)->kv().last_attended(l).far_field[0].size() + (*s)->kv().last_attended(l).far_field[1].size() > 0);
  }
}

TEST_CASE("a block that fails its checksum fails the step, and the session stays usable") {
  test::TempDir dir("kvt-session");
  auto engine = make_engine(options(dir.path(), kAll));
  auto s = engine->create_session(kContext + 8, "bad");
  REQUIRE(s.ok());
  const SyntheticModel m = model(kContext, 9);
  prefill(**s, m, kContext, 500, nullptr);
  // Flip a byte of the last NVMe-homed block of layer 0 on disk, past every
  // cached copy (the staging cache holds at most 64 blocks; the file holds more).
  Session& ss = **s;
  const uint32_t chunks = ss.kv().store().chunks_per_head();
  uint32_t victim = UINT32_MAX;
  for (uint32_t c = 2; c < 100 && victim == UINT32_MAX; ++c)
    if (ss.kv().store().home_of(c) == storage::Tier::kNvme && !ss.kv().store().resident(c, storage::Tier::kHost) &&
        !ss.kv().store().resident(c, storage::Tier::kGpu))
      victim = c;
  REQUIRE(victim != UINT32_MAX);
  CHECK(victim < chunks);
  {
    const uint64_t offset = ss.kv().store().file().block_offset(victim);
    std::fstream f(ss.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset + 100));
    const char c = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(offset + 100));
    f.put(static_cast<char>(c ^ 0x40));
  }
  Status failure;
  decode(ss, m, 0, &failure);
  REQUIRE_FALSE(failure.ok());
  CHECK(failure.code() == StatusCode::kCorrupt);
  CHECK(failure.message().find("block " + std::to_string(victim)) != std::string::npos);
  // Nothing advanced, and a retry fails the same way instead of using the block.
  CHECK(ss.tokens(0) == kContext);
  Status again;
  decode(ss, m, 0, &again);
  CHECK(again.code() == StatusCode::kCorrupt);
  CHECK(ss.tokens(0) == kContext);
}

TEST_CASE("prefill whose completed chunks are evicted before use reads them home only after their write lands") {
  // A gpu tier of 160 slots: 4 tails, 24 sink/window blocks once protected,
  // and each 512-token block completes 64 blocks (cached on the gpu as their
  // write begins) while attending up to 250 in passes. The passes' own
  // uploads evict completed blocks, which must then come back from home
  // while their home write is still open: it is joined first (an early
  // join). The blocks stay busy until the join, so without it the fetch
  // fails every time, whatever the timing.
  test::TempDir dir("kvt-session");
  EngineOptions o = options(dir.path(), kAll);
  o.gpu_bytes = 160 * 4096;
  auto engine = make_engine(o);
  auto session = engine->create_session(kContext + 8, "evicted");
  REQUIRE_MESSAGE(session.ok(), session.status().to_string());
  Session& s = **session;
  const SyntheticModel m = model(kContext, 13);
  std::vector<float> out0;
  prefill(s, m, kContext, 512, &out0);
  const scheduler::ExecutorStats st = engine->stats();
  MESSAGE("early joins: " << st.home_write_early_joins << ", waiting " << st.home_write_early_wait_us << " us");
  CHECK(st.home_write_early_wait_us > 0);
  CHECK(st.home_write_early_joins > 0);
  // The evicted blocks came back through the pin step: reads from NVMe homes, then uploads.
  MESSAGE("fetched in prefill: " << st.prefill_fetch_nvme_reads << " NVMe reads, " << st.prefill_fetch_uploads
                                 << " uploads");
  CHECK(st.prefill_fetch_uploads > 0);
  CHECK(st.prefill_fetch_nvme_reads > 0);
  const ModelShape sh = shape();
  const size_t qrow = size_t{sh.q_heads} * sh.head_dim;
  for (uint64_t pos : {0ull, 511ull, 512ull, 1023ull, 1030ull, 1535ull, 1999ull}) {
    std::vector<bf16> q(qrow);
    m.prefill_query(0, pos, 1, q);
    CAPTURE(pos);
    const double tol = kDevice == DeviceChoice::kCuda ? 2e-3 : 1e-5;
    CHECK(rel_error(std::span<const float>(out0).subspan(pos * qrow, qrow), dense(m, 0, pos + 1, q).o) < tol);
  }
  // Every block went home: decode over the whole context equals dense attention.
  const StepIo io = decode(s, m, 0);
  for (uint32_t l = 0; l < sh.layers; ++l) CHECK(rel_error(io.out[l], dense(m, l, s.tokens(l), io.q[l]).o) < 1e-5);
}

namespace {

// Caps the size a file of this process may reach (RLIMIT_FSIZE): a write past
// it fails with EFBIG, as a write to a full disk fails. SIGXFSZ is ignored
// meanwhile so that the failure comes back as an error, not a signal.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(uint64_t bytes) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_) == 0);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit cap = old_;
    cap.rlim_cur = bytes;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &cap) == 0);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    std::signal(SIGXFSZ, old_handler_);
  }

 private:
  rlimit old_{};
  void (*old_handler_)(int) = SIG_DFL;
};

}  // namespace

TEST_CASE("a home write that fails behind prefill is prefill's error, naming the block, and the block stays unread") {
  test::TempDir dir("kvt-session");
  auto engine = make_engine(options(dir.path(), 8));
  auto session = engine->create_session(kContext + 8, "full");
  REQUIRE_MESSAGE(session.ok(), session.status().to_string());
  Session& s = **session;
  const SyntheticModel m = model(kContext, 17);
  storage::TieredStore& store = s.kv().store();
  const uint32_t chunks = store.chunks_per_head();
  // Layer 0 of the first 496-token block takes 62 of the 64 host homes; layer
  // 1 takes the last two (chunk 0) and puts chunk 1 on, the first of its
  // blocks on NVMe, past the limit: layer 1's blocks lie after layer 0's.
  const uint32_t first_nvme = 2 * chunks + 1;  // layer 1, kv head 0, chunk 1
  const ModelShape sh = shape();
  const uint32_t n = 496;
  const size_t qrow = size_t{sh.q_heads} * sh.head_dim, kvrow = size_t{sh.kv_heads} * sh.head_dim;
  std::vector<bf16> q(n * qrow), k(n * kvrow), v(n * kvrow);
  Status failed;
  {
    const FileSizeLimit limit(store.file().block_offset(2 * chunks));
    for (uint32_t l = 0; l < sh.layers; ++l) {
      m.kv(l, 0, n, k, v);
      m.prefill_query(l, 0, n, q);
      const Status st = s.prefill(l, 0, n, q, k, v);
      if (l == 0) REQUIRE_MESSAGE(st.ok(), st.to_string());
      if (l == 1) failed = st;
    }
  }
  REQUIRE(store.home_of(first_nvme) == storage::Tier::kNvme);
  REQUIRE_FALSE(failed.ok());
  CHECK(failed.code() == StatusCode::kIoError);
  CHECK_MESSAGE(failed.message().find("block " + std::to_string(first_nvme) + " (") != std::string::npos,
                failed.message());
  CHECK(failed.message().find("prefill of layer 1") != std::string::npos);
  // The failed blocks are in no tier, and reading one is an error, not stale bytes.
  for (uint32_t c = 1; c < n / 16; ++c) {
    CAPTURE(c);
    const uint32_t b = 2 * chunks + c;
    CHECK_FALSE(store.resident(b, storage::Tier::kGpu));
    CHECK_FALSE(store.resident(b, storage::Tier::kHost));
    CHECK(store.wait(store.prefetch(std::vector<uint32_t>{b}, storage::Tier::kGpu))
              .message()
              .find("has not been written home") != std::string::npos);
  }
  // Layer 0 landed whole.
  for (uint32_t c = 0; c < n / 16; ++c) CHECK(store.resident(c, storage::Tier::kHost));
}

TEST_CASE("bad input is refused before anything is touched") {
  test::TempDir dir("kvt-session");
  SUBCASE("a gpu budget below sinks + window + tails") {
    EngineOptions o = options(dir.path(), 8);
    o.gpu_bytes = 20 * 4096;
    auto e = make_engine(o);
    auto s = e->create_session(kContext, "small");
    REQUIRE_FALSE(s.ok());
    CHECK(s.status().message().find("gpu") != std::string::npos);
    CHECK_FALSE(std::filesystem::exists(dir.path() / "small.kv"));
  }
  SUBCASE("a missing nvme directory") {
    EngineOptions o = options(dir.path() / "nope", 8);
    auto e = Engine::create(o);
    REQUIRE_FALSE(e.ok());
    CHECK(e.status().message().find("nope") != std::string::npos);
  }
  SUBCASE("prefill out of order, past max_tokens, and decode before prefill") {
    auto e = make_engine(options(dir.path(), 8));
    auto s = e->create_session(100, "order");
    REQUIRE(s.ok());
    const SyntheticModel m = model(100, 1);
    const ModelShape sh = shape();
    std::vector<bf16> q(10 * sh.q_heads * sh.head_dim), k(10 * sh.kv_heads * sh.head_dim), v(k.size());
    Status st = (*s)->prefill(0, 5, 10, q, k, v);
    CHECK(st.message().find("must start there") != std::string::npos);
    std::vector<float> out(sh.q_heads * sh.head_dim);
    st = (*s)->decode_step(0, std::span<const bf16>(q).first(sh.q_heads * sh.head_dim),
                           std::span<const bf16>(k).first(sh.kv_heads * sh.head_dim),
                           std::span<const bf16>(v).first(sh.kv_heads * sh.head_dim), out);
    CHECK(st.message().find("prefill at least one token") != std::string::npos);
    prefill(**s, m, 100, 50, nullptr);
    st = (*s)->prefill(0, 100, 10, q, k, v);
    CHECK(st.code() == StatusCode::kOutOfRange);
  }
}
