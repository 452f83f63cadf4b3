#include "kvtier/runtime/synthetic_run.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>
#include <thread>

#include "kvtier/core/block.h"
#include "kvtier/cpu/fidelity.h"
#include "kvtier/runtime/synthetic_model.h"

namespace kvtier::runtime {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = p * double(v.size() - 1);
  const size_t i = static_cast<size_t>(pos);
  const double f = pos - double(i);
  return i + 1 < v.size() ? v[i] * (1 - f) + v[i + 1] * f : v[i];
}

// K and V of tokens [first, first + n) of a layer, generated on all cores.
void parallel_kv(const SyntheticModel& m, uint32_t layer, uint64_t first, uint32_t n, std::vector<bf16>& k,
                 std::vector<bf16>& v, std::vector<bf16>* q) {
  const ModelShape& s = m.shape();
  const size_t kvrow = size_t{s.kv_heads} * s.head_dim, qrow = size_t{s.q_heads} * s.head_dim;
  k.resize(n * kvrow);
  v.resize(n * kvrow);
  if (q != nullptr) q->resize(n * qrow);
  const uint32_t workers = std::max(1u, std::min(std::thread::hardware_concurrency(), (n + 255) / 256));
  std::vector<std::future<void>> jobs;
  for (uint32_t w = 0; w < workers; ++w) {
    const uint32_t b = static_cast<uint32_t>(uint64_t{n} * w / workers), e = static_cast<uint32_t>(uint64_t{n} * (w + 1) / workers);
    if (b == e) continue;
    jobs.push_back(std::async(std::launch::async, [&, b, e] {
      m.kv(layer, first + b, e - b, std::span<bf16>(k).subspan(b * kvrow, (e - b) * kvrow),
           std::span<bf16>(v).subspan(b * kvrow, (e - b) * kvrow));
      if (q != nullptr) m.prefill_query(layer, first + b, e - b, std::span<bf16>(*q).subspan(b * qrow, (e - b) * qrow));
    }));
  }
  for (auto& j : jobs) j.get();
}

struct Sequence {
  std::unique_ptr<SyntheticModel> model;
  std::unique_ptr<Session> session;
};

// Prefill of every sequence, block by block and layer by layer. The synthetic
// q, k, v of the next (block, layer) are generated on other threads while the
// engine prefills the current one, so generation hides behind kvtier's work
// (attention_s counts only the time inside Session::prefill).
Status prefill_all(Engine& engine, std::vector<Sequence>& seqs, const SyntheticRunConfig& c, double& attention_s) {
  const ModelShape& s = engine.options().shape;
  struct Work {
    size_t seq;
    uint64_t first;
    uint32_t n, layer;
  };
  std::vector<Work> work;
  for (size_t b = 0; b < seqs.size(); ++b)
    for (uint64_t t = 0; t < c.context_tokens; t += c.prefill_block)
      for (uint32_t l = 0; l < s.layers; ++l)
        work.push_back({b, t, static_cast<uint32_t>(std::min<uint64_t>(c.prefill_block, c.context_tokens - t)), l});
  struct Buffers {
    std::vector<bf16> q, k, v;
  };
  Buffers bufs[2];
  auto generate = [&](size_t i) {
    const Work& w = work[i];
    Buffers& b = bufs[i % 2];
    parallel_kv(*seqs[w.seq].model, w.layer, w.first, w.n, b.k, b.v, &b.q);
  };
  const uint64_t total = c.context_tokens * seqs.size();
  uint64_t done = 0;
  attention_s = 0;
  if (!work.empty()) generate(0);
  for (size_t i = 0; i < work.size(); ++i) {
    std::future<void> next;
    if (i + 1 < work.size()) next = std::async(std::launch::async, generate, i + 1);
    const Work& w = work[i];
    Buffers& b = bufs[i % 2];
    const double t0 = now_s();
    const Status st = seqs[w.seq].session->prefill(w.layer, w.first, w.n, b.q, b.k, b.v);
    attention_s += now_s() - t0;
    if (next.valid()) next.get();  // before returning: the task uses bufs
    KVT_RETURN_IF_ERROR(st.with_context("prefill of layer " + std::to_string(w.layer) + " at token " +
                                        std::to_string(w.first)));
    if (w.layer + 1 == s.layers) {
      done += w.n;
      if (c.progress) c.progress(done, total);
    }
  }
  return Status::ok_status();
}

// One decode step (all layers) of every sequence at decode step `step`.
// Returns the seconds spent inside the engine; fills outs[b][layer] when asked.
Result<double> decode_step(Engine& engine, std::vector<Sequence>& seqs, uint64_t step,
                           std::vector<std::vector<bf16>>* q_keep, std::vector<std::vector<float>>* out_keep,
                           uint32_t keep_layer) {
  const ModelShape& s = engine.options().shape;
  const size_t qrow = size_t{s.q_heads} * s.head_dim, kvrow = size_t{s.kv_heads} * s.head_dim;
  const size_t B = seqs.size();
  std::vector<std::vector<bf16>> q(B, std::vector<bf16>(qrow)), k(B, std::vector<bf16>(kvrow)), v(B, std::vector<bf16>(kvrow));
  std::vector<std::vector<float>> out(B, std::vector<float>(qrow));
  double inside = 0;
  for (uint32_t l = 0; l < s.layers; ++l) {
    std::vector<DecodeRequest> reqs;
    for (size_t b = 0; b < B; ++b) {
      const uint64_t pos = seqs[b].session->tokens(l);
      seqs[b].model->decode_query(l, step, q[b]);
      seqs[b].model->kv(l, pos, 1, k[b], v[b]);
      reqs.push_back({seqs[b].session.get(), q[b], k[b], v[b], out[b]});
    }
    const double t0 = now_s();
    KVT_RETURN_IF_ERROR(engine.decode_layer(l, reqs).with_context("decode step " + std::to_string(step) + ", layer " +
                                                                  std::to_string(l)));
    inside += now_s() - t0;
    if (q_keep != nullptr && l == keep_layer) {
      *q_keep = q;
      *out_keep = out;
    }
  }
  return inside;
}

Result<std::vector<Sequence>> make_sequences(Engine& engine, const SyntheticRunConfig& c, uint32_t batch,
                                             uint64_t max_tokens, const std::vector<Needle>& needles,
                                             const std::string& prefix) {
  std::vector<Sequence> seqs;
  for (uint32_t b = 0; b < batch; ++b) {
    SyntheticModelOptions mo;
    mo.shape = engine.options().shape;
    mo.context_tokens = c.context_tokens;
    mo.seed = c.seed + b;
    mo.hidden = c.hidden;
    mo.query_correlation = c.query_correlation;
    if (b == 0) mo.needles = needles;
    KVT_ASSIGN_OR_RETURN(SyntheticModel m, SyntheticModel::create(mo));
    Sequence x;
    x.model = std::make_unique<SyntheticModel>(std::move(m));
    KVT_ASSIGN_OR_RETURN(x.session, engine.create_session(max_tokens, prefix + std::to_string(b)));
    seqs.push_back(std::move(x));
  }
  return seqs;
}

// The share of the selected blocks kept from the previous step.
double kept_share(const scheduler::ExecutorStats& st) {
  return st.selection_compared > 0 ? double(st.kept_from_previous) / double(st.selection_compared) : 0;
}

// The timed steps of one decode phase, after its warm-up: step indices
// first_step + warmup_steps + i; every verify_every-th step one layer
// (rotating) is checked against dense fp64 outside the timing.
struct PhaseResult {
  std::vector<double> step_seconds, rel_error, mass_recall;
  uint32_t verified = 0;
  double steps_per_s() const { return 1.0 / std::max(percentile(step_seconds, 0.5), 1e-12); }  // median
  double rel_error_p50() const { return percentile(rel_error, 0.5); }
  double mass_recall_p10() const { return percentile(mass_recall, 0.1); }
  double mass_recall_mean() const {
    double sum = 0;
    for (double r : mass_recall) sum += r;
    return mass_recall.empty() ? 0 : sum / double(mass_recall.size());
  }
};

Result<PhaseResult> timed_phase(Engine& engine, std::vector<Sequence>& seqs, const SyntheticRunConfig& c,
                                uint64_t first_step, bool verify_steps, const std::function<void()>& after_warmup) {
  const uint32_t layers = engine.options().shape.layers;
  for (uint32_t i = 0; i < c.warmup_steps; ++i)
    KVT_RETURN_IF_ERROR(decode_step(engine, seqs, first_step + i, nullptr, nullptr, 0).status());
  engine.reset_stats();
  if (after_warmup) after_warmup();
  PhaseResult r;
  for (uint32_t i = 0; i < c.decode_steps; ++i) {
    const bool verify = verify_steps && c.verify_every > 0 && i % c.verify_every == 0;
    const uint32_t vlayer = verify ? (i / c.verify_every) % layers : 0;
    std::vector<std::vector<bf16>> qk;
    std::vector<std::vector<float>> ok;
    KVT_ASSIGN_OR_RETURN(const double secs, decode_step(engine, seqs, first_step + c.warmup_steps + i,
                                                        verify ? &qk : nullptr, verify ? &ok : nullptr, vlayer));
    r.step_seconds.push_back(secs);
    if (verify) {
      KVT_ASSIGN_OR_RETURN(cpu::FidelityReport f, seqs[0].session->verify_last_step(vlayer, qk[0], ok[0]));
      r.rel_error.push_back(f.rel_error);
      r.mass_recall.insert(r.mass_recall.end(), f.mass_recall.begin(), f.mass_recall.end());
      ++r.verified;
    }
  }
  return r;
}

}  // namespace

Result<SyntheticRunReport> run_synthetic(const SyntheticRunConfig& c) {
  if (c.context_tokens == 0) return invalid_argument("run: context_tokens=0; give a context of at least one token");
  if (c.batch == 0) return invalid_argument("run: batch=0; at least one sequence");
  if (c.prefill_block == 0) return invalid_argument("run: prefill_block=0");
  if (c.decode_steps == 0) return invalid_argument("run: decode_steps=0; at least one decode step");
  // The trace gives overlap_fraction; without one from the caller, keep our own.
  scheduler::TraceRecorder own_trace;
  EngineOptions eo = c.engine;
  if (eo.trace == nullptr) eo.trace = &own_trace;
  eo.max_sessions = std::max(eo.max_sessions, c.batch);
  scheduler::TraceRecorder* trace = eo.trace;
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::create(eo));
  // Copies: the engine goes away before the full-budget check.
  const ModelShape s = engine->options().shape;
  const SparsityPolicy policy = engine->options().policy;
  SyntheticRunReport rep;
  rep.backend = engine->describe();

  // Needles: one per depth, each asked for at its own decode step after the timed ones.
  const uint64_t first_needle_step = uint64_t{c.warmup_steps} + c.decode_steps;
  std::vector<Needle> needles;
  if (c.needle_depths > 0 && c.context_tokens >= 2 * uint64_t{policy.chunk_tokens}) {
    const std::vector<double> depths = cpu::depths(c.needle_depths);
    for (uint32_t i = 0; i < c.needle_depths; ++i) {
      Needle n;
      n.tokens = policy.chunk_tokens;
      // Block-aligned, so that the planted block is exactly one chunk.
      const uint64_t chunks = c.context_tokens / policy.chunk_tokens;
      n.first_token = std::min<uint64_t>(chunks - 1, static_cast<uint64_t>(std::llround(depths[i] * double(chunks - 1)))) *
                      policy.chunk_tokens;
      n.query_step = first_needle_step + i;
      needles.push_back(n);
    }
  }
  const uint64_t second_steps = c.second_query_correlation >= 0 ? uint64_t{c.warmup_steps} + c.decode_steps : 0;
  const bool late_phase = c.late_summary_phase && c.engine.late == scheduler::LatePolicy::kWait;
  const uint64_t late_steps = late_phase ? uint64_t{c.warmup_steps} + c.decode_steps : 0;
  const uint64_t steps_total = first_needle_step + needles.size() + second_steps + late_steps;
  const uint64_t max_tokens = c.context_tokens + steps_total + 1;
  KVT_ASSIGN_OR_RETURN(std::vector<Sequence> seqs, make_sequences(*engine, c, c.batch, max_tokens, needles, "seq"));

  // Prefill.
  engine->reset_stats();
  const double p0 = now_s();
  double attention_s = 0;
  KVT_RETURN_IF_ERROR(prefill_all(*engine, seqs, c, attention_s));
  rep.prefill_seconds = attention_s;
  rep.prefill_tokens_per_s = double(c.context_tokens) * double(c.batch) / std::max(attention_s, 1e-9);
  rep.prefill_wall_seconds = now_s() - p0;
  rep.placement = seqs[0].session->placement();
  rep.stats_prefill = engine->stats();

  // Decode: warm-up, then timed steps; sampled verification outside the timing.
  const auto phase = [&](const char* name) {
    if (c.on_phase) c.on_phase(name);
  };
  phase("decode (first phase)");
  double trace_from = 0;
  KVT_ASSIGN_OR_RETURN(const PhaseResult timed, timed_phase(*engine, seqs, c, 0, true, [&] { trace_from = trace->now_us(); }));
  rep.step_seconds = timed.step_seconds;
  rep.verified = timed.verified;
  rep.stats = engine->stats();
  rep.decode_steps_per_s = timed.steps_per_s();
  rep.decode_tokens_per_s = rep.decode_steps_per_s * c.batch;
  rep.selection_overlap = kept_share(rep.stats);
  rep.late_blocks_per_step = double(rep.stats.late_blocks) / c.decode_steps;
  if (!timed.rel_error.empty()) {
    rep.rel_error_p50 = timed.rel_error_p50();
    rep.rel_error_max = *std::max_element(timed.rel_error.begin(), timed.rel_error.end());
    rep.mass_recall_p10 = timed.mass_recall_p10();
    rep.mass_recall_mean = timed.mass_recall_mean();
  }
  {
    std::vector<std::vector<scheduler::TraceInterval>> lanes;
    for (const char* name : {"GPU compute", "GPU stand-in (CPU)", "copy engine (h2d uploads)", "CPU workers",
                             "io_uring (NVMe reads)"}) {
      std::vector<scheduler::TraceInterval> in;
      for (const auto& iv : trace->busy(trace->lane(name)))
        if (iv.start_us >= trace_from) in.push_back(iv);
      if (!in.empty()) lanes.push_back(std::move(in));
    }
    rep.overlap_fraction = scheduler::overlap_fraction(lanes);
  }

  // Second phase: the same contexts, queries of another correlation (the
  // model's keys and values are the same for the same seed).
  if (c.second_query_correlation >= 0) {
    phase("decode (second phase)");
    std::vector<std::unique_ptr<SyntheticModel>> first(seqs.size());
    for (size_t b = 0; b < seqs.size(); ++b) {
      SyntheticModelOptions mo = seqs[b].model->options();
      mo.query_correlation = c.second_query_correlation;
      mo.needles.clear();  // needles change context keys only; appended tokens are the same
      KVT_ASSIGN_OR_RETURN(SyntheticModel m2, SyntheticModel::create(mo));
      first[b] = std::move(seqs[b].model);
      seqs[b].model = std::make_unique<SyntheticModel>(std::move(m2));
    }
    KVT_ASSIGN_OR_RETURN(const PhaseResult second, timed_phase(*engine, seqs, c, 0, false, nullptr));
    rep.stats_second = engine->stats();
    rep.decode_steps_per_s_second = second.steps_per_s();
    rep.selection_overlap_second = kept_share(rep.stats_second);
    rep.late_blocks_per_step_second = double(rep.stats_second.late_blocks) / c.decode_steps;
    for (size_t b = 0; b < seqs.size(); ++b) seqs[b].model = std::move(first[b]);
  }

  // Late-summary phase: the first phase's queries continued (step indices
  // after the needles' so that no needle query is reused), NVMe blocks that
  // have not landed contribute their summaries this step.
  if (late_phase) {
    phase("decode (late-summary phase)");
    engine->set_late_policy(scheduler::LatePolicy::kSummary);
    KVT_ASSIGN_OR_RETURN(const PhaseResult late,
                         timed_phase(*engine, seqs, c, first_needle_step + needles.size(), true, nullptr));
    rep.verified_late = late.verified;
    rep.stats_late = engine->stats();
    rep.decode_steps_per_s_late = late.steps_per_s();
    rep.late_blocks_per_step_late = double(rep.stats_late.late_blocks) / c.decode_steps;
    if (!late.rel_error.empty()) {
      rep.rel_error_p50_late = late.rel_error_p50();
      rep.mass_recall_p10_late = late.mass_recall_p10();
      rep.mass_recall_mean_late = late.mass_recall_mean();
    }
    engine->set_late_policy(c.engine.late);
  }

  // Needles: one decode step per needle; recalled when the needle's chunk was
  // attended exactly (selected, or in the sinks or window) by a KV head.
  if (!needles.empty()) {
    phase("needles");
    const std::vector<NeedlePlacement> where = seqs[0].model->needle_placements(policy.chunk_tokens);
    uint64_t hit = 0, trials = 0;
    for (size_t i = 0; i < needles.size(); ++i) {
      KVT_RETURN_IF_ERROR(decode_step(*engine, seqs, first_needle_step + i, nullptr, nullptr, 0).status());
      for (uint32_t l = 0; l < s.layers; ++l) {
        const cpu::AttendedSet& att = seqs[0].session->kv().last_attended(l);
        for (uint32_t h = 0; h < s.kv_heads; ++h) {
          ++trials;
          hit += std::binary_search(att.chunks[h].begin(), att.chunks[h].end(), where[i].block) ? 1 : 0;
        }
      }
    }
    rep.needle_recall = double(hit) / double(trials);
  }
  phase("release");
  seqs.clear();
  engine.reset();  // its pinned host and GPU memory go back before the next engine

  // Full budget: top-k covering every far chunk must equal dense to rounding.
  // A context of at most 32K tokens, with budgets sized to it (its KV in host
  // RAM twice over, a GPU tier of a quarter of it, so NVMe and passes are used
  // as in the main run), not the main run's.
  if (c.full_budget_check) {
    phase("full-budget check");
    SyntheticRunConfig fc = c;
    fc.context_tokens = std::min<uint64_t>(c.context_tokens, 32768);
    fc.engine.policy.topk_chunks = static_cast<uint32_t>((fc.context_tokens + policy.chunk_tokens) / policy.chunk_tokens);
    fc.engine.trace = nullptr;
    fc.engine.max_sessions = 1;
    const uint64_t kv_bytes = BlockGeometry(s, policy.chunk_tokens).slot_bytes() * s.layers * s.kv_heads *
                              ((fc.context_tokens + 2 * s.layers) / policy.chunk_tokens + 1);
    fc.engine.host_bytes = std::min(c.engine.host_bytes, kv_bytes / 2);
    fc.engine.host_cache_bytes = 0;
    fc.engine.gpu_bytes = std::min(c.engine.gpu_bytes, std::max(kv_bytes / 4, uint64_t{64} << 20));
    KVT_ASSIGN_OR_RETURN(std::unique_ptr<Engine> full, Engine::create(fc.engine));
    KVT_ASSIGN_OR_RETURN(std::vector<Sequence> fs, make_sequences(*full, fc, 1, fc.context_tokens + s.layers + 2, {}, "full"));
    double unused = 0;
    fc.progress = nullptr;
    KVT_RETURN_IF_ERROR(prefill_all(*full, fs, fc, unused));
    double worst = 0;
    for (uint32_t l = 0; l < s.layers; ++l) {
      std::vector<std::vector<bf16>> qk;
      std::vector<std::vector<float>> ok;
      KVT_RETURN_IF_ERROR(decode_step(*full, fs, 0, &qk, &ok, l).status());
      // decode_step advanced every layer; verify layer l of the last step only once per layer.
      KVT_ASSIGN_OR_RETURN(cpu::FidelityReport f, fs[0].session->verify_last_step(l, qk[0], ok[0]));
      // A NaN output is a failure, not a small error: std::max(worst, NaN)
      // would drop it, std::max(NaN, x) keeps it.
      worst = std::isnan(f.rel_error) ? f.rel_error : std::max(worst, f.rel_error);
    }
    rep.rel_error_full_budget = worst;
    rep.full_budget_context = fc.context_tokens;
  }
  return rep;
}

nlohmann::json SyntheticRunReport::to_json() const {
  nlohmann::json j;
  j["backend"] = backend;
  j["placement"] = {{"host_home_bytes", placement.host_home_bytes},
                    {"nvme_home_bytes", placement.nvme_home_bytes},
                    {"gpu_cached_bytes", placement.gpu_cached_bytes},
                    {"summary_bytes", placement.summary_bytes}};
  j["prefill_seconds"] = prefill_seconds;
  j["prefill_wall_seconds"] = prefill_wall_seconds;
  j["prefill_tokens_per_s"] = prefill_tokens_per_s;
  j["decode_steps_per_s"] = decode_steps_per_s;
  j["decode_tokens_per_s"] = decode_tokens_per_s;
  j["overlap_fraction"] = overlap_fraction;
  j["selection_overlap"] = selection_overlap;
  j["late_blocks_per_step"] = late_blocks_per_step;
  j["mass_recall_p10"] = mass_recall_p10;
  j["mass_recall_mean"] = mass_recall_mean;
  j["rel_error_p50"] = rel_error_p50;
  j["rel_error_max"] = rel_error_max;
  j["verified"] = verified;
  j["needle_recall"] = needle_recall;
  j["rel_error_full_budget"] = rel_error_full_budget;
  j["full_budget_context"] = full_budget_context;
  j["step_seconds"] = step_seconds;
  j["decode_steps_per_s_second"] = decode_steps_per_s_second;
  j["selection_overlap_second"] = selection_overlap_second;
  j["late_blocks_per_step_second"] = late_blocks_per_step_second;
  j["decode_steps_per_s_late"] = decode_steps_per_s_late;
  j["late_blocks_per_step_late"] = late_blocks_per_step_late;
  j["mass_recall_p10_late"] = mass_recall_p10_late;
  j["mass_recall_mean_late"] = mass_recall_mean_late;
  j["rel_error_p50_late"] = rel_error_p50_late;
  j["verified_late"] = verified_late;
  const auto& st = stats;
  j["stats"] = {{"layer_steps", st.layer_steps},
                {"selected_blocks", st.selected_blocks},
                {"gpu_resident_blocks", st.gpu_resident_blocks},
                {"uploaded_blocks", st.uploaded_blocks},
                {"cpu_blocks", st.cpu_blocks},
                {"nvme_read_blocks", st.nvme_read_blocks},
                {"late_blocks", st.late_blocks},
                {"write_backs", st.write_backs},
                {"score_us", st.score_us},
                {"gpu_wait_us", st.gpu_wait_us},
                {"cpu_attend_us", st.cpu_attend_us},
                {"cpu_kernel_us", st.cpu_kernel_us},
                {"cpu_calls", st.cpu_calls},
                {"upload_wait_us", st.upload_wait_us},
                {"read_wait_us", st.read_wait_us},
                {"merge_us", st.merge_us},
                {"decode_us", st.decode_us},
                {"prepare_us", st.prepare_us},
                {"graph_us", st.graph_us},
                {"plan_us", st.plan_us},
                {"plan_residency_us", st.plan_residency_us},
                {"plan_planner_us", st.plan_planner_us},
                {"plan_pin_us", st.plan_pin_us},
                {"plan_issue_us", st.plan_issue_us},
                {"late_reads_dropped", st.late_reads_dropped},
                {"ahead_reads_dropped", st.ahead_reads_dropped},
                {"uploads_via_mover", st.uploads_via_mover},
                {"reread_blocks", st.reread_blocks},
                {"plan_warm_us", st.plan_warm_us},
                {"prepare_host_us", st.prepare_host_us},
                {"prepare_gpu_us", st.prepare_gpu_us}};
  return j;
}

}  // namespace kvtier::runtime
