// One decode step of one layer for a batch of sequences (executor.h's diagram).
#include <oneapi/tbb/flow_graph.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <cstring>
#include <map>
#include <optional>
#include <thread>
#include <unordered_set>

#include "executor_internal.h"

namespace kvtier::scheduler {

using detail::wall_us;
using storage::Tier;

// Keeps the pins of the hot set (sinks + window full chunks) of (layer, every
// head) in step with `tokens`: pins chunks that joined, drops those that left.
Status Executor::refresh_hot_pins(SequenceKv& seq, uint32_t layer, uint64_t tokens) {
  const uint32_t kvh = options_.shape.kv_heads;
  const ChunkRanges r = chunk_ranges(options_.policy, tokens);
  const uint32_t tail_chunk = r.chunks - 1;
  std::vector<uint32_t> want;
  for (uint32_t c = 0; c < std::min(r.far_begin, tail_chunk); ++c) want.push_back(c);
  for (uint32_t c = std::max(r.far_end, r.far_begin); c < tail_chunk; ++c) want.push_back(c);
  std::vector<std::vector<uint32_t>> missing(kvh);
  bool any = false;
  for (uint32_t h = 0; h < kvh; ++h) {
    // Both are in chunk order: one merge drops the pins no longer wanted and
    // finds the wanted chunks not pinned.
    auto& pins = seq.hot_pins_[layer * kvh + h];
    auto it = pins.begin();
    size_t i = 0;
    while (it != pins.end() || i < want.size()) {
      if (it == pins.end() || (i < want.size() && want[i] < it->first)) {
        missing[h].push_back(want[i++]);
        any = true;
      } else if (i == want.size() || it->first < want[i]) {
        it = pins.erase(it);
      } else {
        ++it;
        ++i;
      }
    }
  }
  if (!any) return Status::ok_status();
  std::vector<std::vector<storage::BlockPin>> got;
  KVT_RETURN_IF_ERROR(pin_on_gpu(seq, layer, missing, got));
  for (uint32_t h = 0; h < kvh; ++h)
    for (size_t j = 0; j < missing[h].size(); ++j) seq.hot_pins_[layer * kvh + h].emplace(missing[h][j], std::move(got[h][j]));
  return Status::ok_status();
}


// One sequence's working state through a step.
struct SeqStep {
  uint64_t tokens = 0;  // after the append
  ChunkRanges ranges;
  bool completed = false;  // the append filled the tail block
  std::vector<std::vector<uint32_t>> selected;  // [kv_heads]
  std::vector<storage::BlockPin> gpu_pins;      // selected blocks attended from GPU slots
  std::vector<std::vector<uint32_t>> gpu_sel;   // [kv_heads] slots of those
  std::vector<std::vector<const bf16*>> gpu_sel_ptr;  // same, as pointers (CPU stand-in)
  // Takes a pinned GPU copy of a selected block of KV head h into the GPU's lists.
  void select_on_gpu(uint32_t h, uint32_t slot, storage::BlockPin pin) {
    gpu_sel[h].push_back(slot);
    gpu_sel_ptr[h].push_back(reinterpret_cast<const bf16*>(pin.data()));
    gpu_pins.push_back(std::move(pin));
  }
  std::vector<uint32_t> upload;                 // flat block ids
  std::vector<std::vector<uint32_t>> upload_chunks;  // [kv_heads]
  std::vector<std::vector<uint32_t>> cpu_chunks;     // [kv_heads]
  std::vector<std::vector<uint32_t>> late_chunks;    // [kv_heads]
  std::vector<uint32_t> reads;                  // flat ids of new NVMe reads attended this step
  std::vector<uint32_t> reads_sorted;           // `reads`, sorted once they are final
  bool read_now(uint32_t f) const { return std::binary_search(reads_sorted.begin(), reads_sorted.end(), f); }
  std::vector<uint32_t> late_reads;             // flat ids of new NVMe reads that land for later steps
  std::vector<std::vector<uint32_t>> rounds;    // `reads` in staging-sized rounds
  size_t in_rounds = 0;                         // reads[0, in_rounds) are cut into rounds
  std::vector<storage::Ticket> tickets;         // [round], once issued
  std::vector<double> issued_us;                // [round] trace time of issue
  size_t issued = 0;
  size_t waited = 0;                            // rounds whose tickets are spent
  storage::Ticket upload_ticket;
  bool has_upload = false;
  double upload_issued_us = 0;
  uint64_t mover_uploads_before = 0;            // the store's uploads_via_mover when the upload was queued
  cpu::PartialState hot, sel, host, far;
  std::map<uint32_t, storage::BlockPin> host_pins;  // flat id -> host copy the CPU attends
  std::vector<float> scores;                    // [kv_heads][blocks]
  bool gpu_scored = false;                      // scores are in the GPU's host_scores at score_offset
  uint64_t score_offset = 0;
  double score_us = 0, cpu_attend_us = 0, cpu_kernel_us = 0, read_wait_us = 0;
  uint64_t cpu_calls = 0;
  uint64_t rereads = 0;
};

namespace {

// The longest a serial phase keeps the workers spinning: a prepare or plan
// node takes 0.1-0.4 ms on the GPU host; past this the workers sleep as usual.
constexpr std::chrono::microseconds kWarmLimit{2000};

// How long wait_read polls before it sleeps (ExecutorOptions::poll_reads);
// each poll takes the store's lock briefly, as the mover does to post a result.
constexpr std::chrono::microseconds kPollLimit{2000};

}  // namespace

bool Executor::issue_optional_read(SequenceKv& seq, std::span<const uint32_t> blocks) {
  std::optional<storage::Ticket> t;
  if (options_.drop_optional_reads)
    t = seq.store_->try_prefetch(blocks, Tier::kHost, options_.shape.layers);
  else
    t = seq.store_->prefetch(blocks, Tier::kHost);
  if (!t) return false;
  seq.pending_tickets_.push_back(*t);
  seq.track_reads(*t, blocks);
  return true;
}

namespace {

// Cuts the reads not yet in a round into rounds of kReadRoundBlocks.
void cut_rounds(SeqStep& x) {
  for (size_t i = x.in_rounds; i < x.reads.size(); i += kReadRoundBlocks)
    x.rounds.emplace_back(x.reads.begin() + static_cast<ptrdiff_t>(i),
                          x.reads.begin() + static_cast<ptrdiff_t>(std::min(x.reads.size(), i + kReadRoundBlocks)));
  x.in_rounds = x.reads.size();
}

}  // namespace

void Executor::issue_round(SequenceKv& seq, SeqStep& x) {
  const std::vector<uint32_t>& round = x.rounds[x.issued++];
  const storage::Ticket t = seq.store_->prefetch(round, Tier::kHost);
  x.tickets.push_back(t);
  x.issued_us.push_back(options_.trace != nullptr ? options_.trace->now_us() : 0);
  seq.track_reads(t, round);
}

// A pin of a block's host copy. The staging cache is shared by this step's
// reads in flight, so a copy that landed may be evicted before it is pinned:
// then it is read again (a few times at most; a failed read is the error).
Result<storage::BlockPin> Executor::pin_host(SequenceKv& seq, uint32_t f, uint64_t& rereads) {
  for (int attempt = 0;; ++attempt) {
    Result<storage::BlockPin> pin = seq.store_->pin(f, Tier::kHost);
    if (pin.ok() || pin.status().code() != StatusCode::kUnavailable || attempt == 3) return pin;
    const uint32_t one[1] = {f};
    KVT_RETURN_IF_ERROR(seq.store_->wait(seq.store_->prefetch(one, Tier::kHost)));
    ++rereads;
  }
}

Status Executor::wait_read(SequenceKv& seq, storage::Ticket t, bool keep_warm) {
  std::optional<Status> landed = seq.store_->try_wait(t);
  // Not landed yet: the workers may spin meanwhile (keep_warm), and a read
  // round lands within a few hundred microseconds while a thread asleep on
  // the store's condition variable takes tens more to be woken after it, so
  // with poll_reads ask for a while (yielding the core between asks) first.
  cpu::CpuEngine::WarmHold hold;
  if (!landed && keep_warm && options_.warm_workers) hold = cpu_.keep_warm(kWarmLimit);
  if (!landed && options_.poll_reads) {
    const auto until = std::chrono::steady_clock::now() + kPollLimit;
    while (!(landed = seq.store_->try_wait(t)) && std::chrono::steady_clock::now() < until)
      std::this_thread::yield();
  }
  const Status st = landed ? std::move(*landed) : seq.store_->wait(t);
  hold.release();
  seq.forget_reads(t);
  seq.pending_tickets_.erase(std::remove_if(seq.pending_tickets_.begin(), seq.pending_tickets_.end(),
                                            [&](const storage::Ticket& q) { return q.id == t.id; }),
                             seq.pending_tickets_.end());
  return st;
}

// Waits for the I/O a failed step started on `seq` and drops its pins.
void Executor::release_step(SequenceKv& seq, SeqStep& x) {
  if (x.has_upload) (void)seq.store_->wait(x.upload_ticket);
  x.has_upload = false;
  for (size_t r = x.waited; r < x.tickets.size(); ++r) (void)wait_read(seq, x.tickets[r]);
  x.tickets.clear();
  x.host_pins.clear();
  x.gpu_pins.clear();
}

Status Executor::decode(uint32_t layer, std::span<const DecodeItem> batch) {
  const ModelShape& s = options_.shape;
  const SparsityPolicy& p = options_.policy;
  const uint32_t C = p.chunk_tokens, d = s.head_dim, kvh = s.kv_heads, qh = s.q_heads;
  const uint32_t B = static_cast<uint32_t>(batch.size());
  if (layer >= s.layers) return invalid_argument("decode: layer " + std::to_string(layer) + " of a model with " + std::to_string(s.layers));
  if (B == 0) return invalid_argument("decode: an empty batch");
  const size_t qrow = size_t{qh} * d, kvrow = size_t{kvh} * d;
  std::unordered_set<const SequenceKv*> seen;
  for (uint32_t b = 0; b < B; ++b) {
    const DecodeItem& it = batch[b];
    if (it.seq == nullptr) return invalid_argument("decode: batch entry " + std::to_string(b) + " has no sequence");
    if (!seen.insert(it.seq).second) return invalid_argument("decode: a sequence appears twice in one batch");
    if (it.q.size() != qrow || it.k.size() != kvrow || it.v.size() != kvrow || it.out.size() != qrow)
      return invalid_argument("decode: batch entry " + std::to_string(b) + ": q/k/v/out hold " +
                              std::to_string(it.q.size()) + "/" + std::to_string(it.k.size()) + "/" +
                              std::to_string(it.v.size()) + "/" + std::to_string(it.out.size()) + " elements, need " +
                              std::to_string(qrow) + "/" + std::to_string(kvrow) + "/" + std::to_string(kvrow) + "/" +
                              std::to_string(qrow));
    if (it.seq->layer_tokens_[layer] >= it.seq->max_tokens_)
      return out_of_range("decode: the sequence is full (max_tokens=" + std::to_string(it.seq->max_tokens_) +
                          "); create the session with a larger max_tokens");
    if (it.seq->layer_tokens_[layer] == 0) return invalid_argument("decode: prefill at least one token first");
  }
  const double t_step = wall_us();
  // Workers spin through the serial prepare (released before the graph's
  // parallel scoring) and, below, through the serial plan node.
  cpu::CpuEngine::WarmHold warm;
  if (options_.warm_workers) warm = cpu_.keep_warm(kWarmLimit);
  TraceRecorder* tr = options_.trace;
  const double trace_origin = tr != nullptr ? tr->now_us() : 0.0;
  const float scale = static_cast<float>(1.0 / std::sqrt(double(d)));
  const gpu::SlotArenaView arena{arena_->slot_data(0), arena_->slot_bytes(), arena_->capacity(), C, d};
  std::vector<SeqStep> st(B);

  // 1. Append k, v to each tail (host copy now; device copy by the kernel).
  const double t_host = wall_us();
  std::vector<uint32_t> append_slots, append_rows;
  for (uint32_t b = 0; b < B; ++b) {
    SequenceKv& seq = *batch[b].seq;
    const uint64_t pos = seq.layer_tokens_[layer];
    const uint32_t row = static_cast<uint32_t>(pos % C);
    for (uint32_t h = 0; h < kvh; ++h) {
      bf16* t = seq.tail(layer, h);
      std::memcpy(t + size_t{row} * d, batch[b].k.data() + size_t{h} * d, d * sizeof(bf16));
      std::memcpy(t + size_t{C} * d + size_t{row} * d, batch[b].v.data() + size_t{h} * d, d * sizeof(bf16));
      append_slots.push_back(seq.tail_slots_[layer * kvh + h]);
    }
    append_rows.push_back(row);
    st[b].tokens = pos + 1;
    st[b].ranges = chunk_ranges(p, st[b].tokens);
    st[b].completed = st[b].tokens % C == 0;
    KVT_RETURN_IF_ERROR(refresh_hot_pins(seq, layer, st[b].tokens));
  }
  stats_.prepare_host_us += wall_us() - t_host;

  // 2. GPU: the hot set needs no selection, so it starts now.
  auto hot_lists = [&]() {
    SlotLists l;
    for (uint32_t b = 0; b < B; ++b) {
      SequenceKv& seq = *batch[b].seq;
      for (uint32_t h = 0; h < kvh; ++h) {
        for (const auto& [chunk, pin] : seq.hot_pins_[layer * kvh + h]) l.slots.push_back(slot_of(pin.data()));
        l.slots.push_back(seq.tail_slots_[layer * kvh + h]);
        l.close_list(static_cast<uint32_t>((st[b].tokens - 1) % C) + 1);
      }
    }
    return l;
  };
  if (cuda_ != nullptr) {
    const double t_gpu = wall_us();
    double score_wait = 0;
    KVT_RETURN_IF_ERROR(gpu_->begin_step(batch, qh, kvh, d, append_slots, append_rows));
    // Summary scoring of the sequences that mirror their mean keys, first on
    // the stream: the CPU waits for these scores before anything else.
    std::vector<Gpu::ScoreJob> jobs;
    uint64_t offset = 0;
    for (uint32_t b = 0; b < B; ++b) {
      SequenceKv& seq = *batch[b].seq;
      const GpuSummaries& g = seq.gpu_summaries_;
      const ChunkRanges& r = st[b].ranges;
      if (!g.on() || r.far_end <= r.far_begin || p.topk_chunks == 0) continue;
      KVT_RETURN_IF_ERROR(sync_gpu_summaries(seq, layer, r.far_end));
      Gpu::ScoreJob j;
      j.b = b;
      j.kmean = arena_->slot_data(g.first_slot) + uint64_t{layer} * kvh * g.head_rows * g.row_bytes;
      j.f32 = p.summary_kind == SummaryKind::kMeanF32;
      j.row_stride = g.row_bytes / (j.f32 ? sizeof(float) : sizeof(bf16));
      j.head_rows = g.head_rows;
      j.far_begin = r.far_begin;
      j.far_end = r.far_end;
      j.offset = offset;
      offset += uint64_t{kvh} * r.far_end;
      st[b].gpu_scored = true;
      st[b].score_offset = j.offset;
      jobs.push_back(j);
    }
    KVT_RETURN_IF_ERROR(gpu_->score(jobs, qh, kvh, d, scale));
    gpu::AppendArgs ap;
    ap.k = detail::at<const bf16>(gpu_->dev_in.data(), gpu_->in_off_k);
    ap.v = detail::at<const bf16>(gpu_->dev_in.data(), gpu_->in_off_v);
    ap.batch = B;
    ap.kv_heads = kvh;
    ap.arena = arena;
    ap.slots = detail::at<const uint32_t>(gpu_->dev_in.data(), gpu_->in_off_slots);
    ap.rows = detail::at<const uint32_t>(gpu_->dev_in.data(), gpu_->in_off_rows);
    KVT_RETURN_IF_ERROR(gpu::append_kv(ap, cuda_->compute_stream()));
    KVT_RETURN_IF_ERROR(gpu_->attend(0, hot_lists(), B, qh, kvh, arena, scale));
    if (!jobs.empty()) {
      const double t0 = wall_us();
      KVT_RETURN_IF_ERROR(gpu_->scored.synchronize());
      const double waited = wall_us() - t0;
      score_wait = waited;
      stats_.gpu_score_wait_us += waited;
      stats_.gpu_scored += jobs.size();
      if (tr != nullptr) tr->complete(lane_gpu_, "summary scoring (wait for scores)", tr->now_us() - waited, waited);
    }
    stats_.prepare_gpu_us += wall_us() - t_gpu - score_wait;
  }

  stats_.prepare_us += wall_us() - t_step;

  // 3. CPU: scoring and top-k, one task per sequence.
  auto score_one = [&](uint32_t b) {
    TraceScope scope(tr, lane_cpu_, "score + top-k");
    const double t0 = wall_us();
    SequenceKv& seq = *batch[b].seq;
    SeqStep& x = st[b];
    x.selected.assign(kvh, {});
    if (x.gpu_scored) {
      cpu_.select(F32View<2>(std::span<const float>(gpu_->scores(x.score_offset), size_t{kvh} * x.ranges.far_end),
                             {kvh, x.ranges.far_end}),
                  p.topk_chunks, x.ranges.far_begin, x.ranges.far_end, x.selected);
    } else if (x.ranges.far_end > x.ranges.far_begin && p.topk_chunks > 0) {
      const cpu::SummaryTable& table = seq.summaries_[layer];
      x.scores.resize(size_t{kvh} * table.blocks());
      cpu_.score(Bf16View<2>(batch[b].q, {qh, d}), table, scale, score_rule_for(p.summary_kind),
                 MutF32View<2>(x.scores, {kvh, table.blocks()}));
      cpu_.select(F32View<2>(x.scores, {kvh, table.blocks()}), p.topk_chunks, x.ranges.far_begin, x.ranges.far_end,
                  x.selected);
    }
    x.score_us = wall_us() - t0;
  };
  // Where the selected blocks are, the plan, and the I/O it starts (serial).
  LayerPlan plan;
  auto plan_step = [&]() -> Status {
  const double t_plan = wall_us();
  std::vector<SequenceStep> plan_in(B);
  uint32_t upload_room = UINT32_MAX;
  for (uint32_t b = 0; b < B; ++b) {
    SequenceKv& seq = *batch[b].seq;
    // Reads that have landed since the last step.
    for (auto it = seq.pending_tickets_.begin(); it != seq.pending_tickets_.end();) {
      std::optional<Status> done = seq.store_->try_wait(*it);
      if (!done) {
        ++it;
        continue;
      }
      seq.forget_reads(*it);
      it = seq.pending_tickets_.erase(it);  // a failed read is retried when selected again
    }
    upload_room = std::min(upload_room, seq.store_->gpu_room());
    plan_in[b].context_tokens = st[b].tokens;
    plan_in[b].tail_block_completed = st[b].completed;
    plan_in[b].selected.assign(kvh, {});
    // Where every selected block is, asked of the store in one call, which
    // also marks the copies found as used now: the reads this step issues
    // next then evict other staging-cache copies first.
    std::vector<uint32_t> flat;
    for (uint32_t h = 0; h < kvh; ++h)
      for (uint32_t c : st[b].selected[h]) flat.push_back(seq.flat(layer, h, c));
    std::vector<Tier> tier(flat.size());
    seq.store_->census(flat, tier);
    size_t i = 0;
    for (uint32_t h = 0; h < kvh; ++h) {
      const std::vector<uint32_t>& prev = seq.last_selection_[layer][h];
      if (!prev.empty()) {
        stats_.selection_compared += st[b].selected[h].size();
        stats_.kept_from_previous += seq.count_kept(prev, st[b].selected[h]);
      }
      plan_in[b].selected[h].reserve(st[b].selected[h].size());
      for (uint32_t c : st[b].selected[h]) {
        const uint32_t f = flat[i];
        const Tier t = tier[i++];
        const Residency where = t == Tier::kGpu                ? Residency::kGpu
                                : t == Tier::kHost             ? Residency::kHost
                                : seq.reading_.count(f) != 0   ? Residency::kNvmeReading
                                                               : Residency::kNvme;
        plan_in[b].selected[h].push_back({c, where});
      }
      stats_.selected_blocks += st[b].selected[h].size();
    }
  }
  stats_.plan_residency_us += wall_us() - t_plan;
  // Under kWait every selected block found only on NVMe is read and waited
  // for, whatever the plan decides for the others: its reads go out now, in
  // rounds, before the planner, pins and uploads (the drive is this step's
  // slowest device when it has any of them).
  if (options_.late == LatePolicy::kWait && options_.early_reads) {
    const double t_early = wall_us();
    for (uint32_t b = 0; b < B; ++b) {
      SequenceKv& seq = *batch[b].seq;
      SeqStep& x = st[b];
      for (uint32_t h = 0; h < kvh; ++h)
        for (const SelectedBlock& sb : plan_in[b].selected[h])
          if (sb.where == Residency::kNvme) x.reads.push_back(seq.flat(layer, h, sb.chunk));
      cut_rounds(x);
      while (x.issued < x.rounds.size() && x.issued < 2) issue_round(seq, x);
    }
    stats_.plan_issue_us += wall_us() - t_early;
  }
  PlanInputs pin_in;
  pin_in.shape = s;
  pin_in.policy = p;
  pin_in.layer = layer;
  pin_in.batch = plan_in;
  pin_in.rates = options_.rates;
  pin_in.late = options_.late;
  pin_in.early_reads = options_.early_reads;
  pin_in.score_on_gpu = std::all_of(st.begin(), st.end(), [](const SeqStep& x) { return x.gpu_scored; });
  // Room for uploads: free slots plus evictable copies, less a margin for the
  // blocks this step completes.
  // (The planner's room is for the batch; each sequence has its own quota,
  // so the smallest room of any sequence is what every one can surely use.)
  pin_in.upload_slots_free = upload_room > kvh ? upload_room - kvh : 0;
  const double t_planner = wall_us();
  KVT_ASSIGN_OR_RETURN(plan, plan_layer(pin_in));
  stats_.late_blocks += plan.late_blocks;
  stats_.plan_planner_us += wall_us() - t_planner;

  // 4. Issue the copy engine's uploads and the NVMe reads (store movers).
  for (uint32_t b = 0; b < B; ++b) {
    SequenceKv& seq = *batch[b].seq;
    SeqStep& x = st[b];
    x.gpu_sel.assign(kvh, {});
    x.gpu_sel_ptr.assign(kvh, {});
    x.upload_chunks.assign(kvh, {});
    x.cpu_chunks.assign(kvh, {});
    x.late_chunks.assign(kvh, {});
    // The reads so far are those issued right after the census (none without early reads).
    std::vector<uint32_t> early = x.reads;
    std::sort(early.begin(), early.end());
    // The planned GPU-resident blocks of every head, pinned under one lock.
    const std::vector<uint32_t> resident =
        seq.flat_blocks(layer, [&](uint32_t h) -> const auto& { return plan.heads[size_t{b} * kvh + h].gpu; });
    std::vector<storage::BlockPin> pinned(resident.size());
    double t_pin = wall_us();
    KVT_RETURN_IF_ERROR(seq.store_->pin_resident(resident, Tier::kGpu, pinned));
    stats_.plan_pin_us += wall_us() - t_pin;
    size_t next = 0;
    for (uint32_t h = 0; h < kvh; ++h) {
      const HeadPlan& hp = plan.heads[size_t{b} * kvh + h];
      for (uint32_t c : hp.gpu) {
        storage::BlockPin& pin = pinned[next++];
        if (pin)
          x.select_on_gpu(h, slot_of(pin.data()), std::move(pin));
        else
          x.upload_chunks[h].push_back(c);  // evicted since the plan looked: upload it again
      }
      x.upload_chunks[h].insert(x.upload_chunks[h].end(), hp.upload.begin(), hp.upload.end());
      x.cpu_chunks[h] = hp.cpu;
      x.late_chunks[h] = hp.late;
      for (uint32_t c : x.upload_chunks[h]) x.upload.push_back(seq.flat(layer, h, c));
      for (uint32_t c : hp.read) {
        const uint32_t f = seq.flat(layer, h, c);
        if (std::find(hp.late.begin(), hp.late.end(), c) != hp.late.end())
          x.late_reads.push_back(f);
        else if (!std::binary_search(early.begin(), early.end(), f))
          x.reads.push_back(f);  // not read early (under kWait the plan reads exactly those)
      }
      stats_.gpu_resident_blocks += hp.gpu.size();
      stats_.cpu_blocks += hp.cpu.size();
    }
    // Host copies the CPU will read are pinned now, before this step's reads
    // can evict them from the staging cache.
    std::vector<uint32_t> on_host;
    x.reads_sorted = x.reads;
    std::sort(x.reads_sorted.begin(), x.reads_sorted.end());
    for (uint32_t h = 0; h < kvh; ++h)
      for (uint32_t c : x.cpu_chunks[h]) {
        const uint32_t f = seq.flat(layer, h, c);
        if (seq.reading_.count(f) == 0 && !x.read_now(f)) on_host.push_back(f);
      }
    std::vector<storage::BlockPin> host_pinned(on_host.size());
    t_pin = wall_us();
    KVT_RETURN_IF_ERROR(seq.store_->pin_resident(on_host, Tier::kHost, host_pinned));
    stats_.plan_pin_us += wall_us() - t_pin;
    const size_t planned_reads = x.reads.size();
    for (size_t i = 0; i < on_host.size(); ++i) {
      if (host_pinned[i])
        x.host_pins.emplace(on_host[i], std::move(host_pinned[i]));
      else
        x.reads.push_back(on_host[i]);  // dropped from staging since the plan looked: read it again
    }
    if (x.reads.size() != planned_reads) {
      x.reads_sorted = x.reads;
      std::sort(x.reads_sorted.begin(), x.reads_sorted.end());
    }
    const double t_issue = wall_us();
    if (!x.upload.empty()) {
      x.upload_issued_us = tr != nullptr ? tr->now_us() : 0;
      x.mover_uploads_before = seq.store_->stats().uploads_via_mover;
      x.upload_ticket = seq.store_->prefetch(x.upload, Tier::kGpu);
      x.has_upload = true;
    }
    // Reads the CPU waits for, in rounds the staging cache can hold; two
    // rounds are in flight at a time, the rest follow as rounds are attended.
    cut_rounds(x);
    while (x.issued < x.rounds.size() && x.issued < 2) issue_round(seq, x);
    // After the reads this step waits for.
    if (!x.late_reads.empty() && !issue_optional_read(seq, x.late_reads)) {
      stats_.late_reads_dropped += x.late_reads.size();
      x.late_reads.clear();
    }
    stats_.plan_issue_us += wall_us() - t_issue;
    stats_.uploaded_blocks += x.upload.size();
    stats_.nvme_read_blocks += x.reads.size() + x.late_reads.size();
  }
    return Status::ok_status();
  };

  // 5. CPU: exact attention over host-resident selected blocks, then the far
  // field (late blocks, and every unselected far block under far_field=summary).
  auto attend_one = [&](uint32_t b) -> Status {
    SequenceKv& seq = *batch[b].seq;
    SeqStep& x = st[b];
    // Reads from earlier steps that this step attends: wait for them.
    std::vector<storage::Ticket> to_wait;
    for (uint32_t h = 0; h < kvh; ++h)
      for (uint32_t c : x.cpu_chunks[h]) {
        const uint32_t f = seq.flat(layer, h, c);
        auto r = seq.reading_.find(f);
        if (r == seq.reading_.end() || x.host_pins.count(f) != 0 ||
            x.read_now(f))
          continue;
        if (std::none_of(to_wait.begin(), to_wait.end(), [&](const storage::Ticket& t) { return t.id == r->second.id; }))
          to_wait.push_back(r->second);
      }
    for (const storage::Ticket& t : to_wait) {
      const double tt0 = tr != nullptr ? tr->now_us() : 0;
      const Status rs = wait_read(seq, t);
      if (tr != nullptr) tr->complete(lane_nvme_, "earlier nvme read (wait)", tt0, tr->now_us() - tt0);
      if (!rs.ok()) return rs.with_context("decode step of layer " + std::to_string(layer) +
                                                           ": reading selected blocks");
    }
    TraceScope scope(tr, lane_cpu_, "cpu attention (host blocks + far field)");
    const double t0 = wall_us();
    // Everything host-resident now (pinned at planning, or read by earlier steps).
    std::vector<std::vector<cpu::HostBlock>> lists(kvh);
    for (uint32_t h = 0; h < kvh; ++h)
      for (uint32_t c : x.cpu_chunks[h]) {
        const uint32_t f = seq.flat(layer, h, c);
        if (x.read_now(f)) continue;  // in a round below
        auto have = x.host_pins.find(f);
        if (have == x.host_pins.end()) {
          Result<storage::BlockPin> pin = pin_host(seq, f, x.rereads);
          if (!pin.ok()) return pin.status().with_context("decode step of layer " + std::to_string(layer));
          have = x.host_pins.emplace(f, std::move(pin).value()).first;
        }
        lists[h].push_back({reinterpret_cast<const bf16*>(have->second.data()), C});
      }
    // Every engine call is timed and counted (cpu_kernel_us, cpu_calls).
    const auto engine_call = [&](const auto& call) {
      const double k0 = wall_us();
      call();
      x.cpu_kernel_us += wall_us() - k0;
      ++x.cpu_calls;
    };
    const Bf16View<2> q(batch[b].q, {qh, d});
    x.host = cpu::PartialState::empty(qh, d);
    if (std::any_of(lists.begin(), lists.end(), [](const auto& l) { return !l.empty(); }))
      engine_call([&] { cpu_.attend(q, lists, C, scale, x.host); });
    {  // the host copies are attended: their pins go under one lock
      std::vector<storage::BlockPin> done;
      done.reserve(x.host_pins.size());
      for (auto& [f, pin] : x.host_pins) done.push_back(std::move(pin));
      seq.store_->release(done);
      x.host_pins.clear();
    }
    // This step's reads, round by round as they land.
    for (size_t r = 0; r < x.rounds.size(); ++r) {
      const double w0 = wall_us();
      // One sequence on a GPU: no other attention needs the workers
      // meanwhile (on the CPU stand-in the "GPU" attention runs on them), so
      // the wait keeps them warm for the round's call.
      const Status rs = wait_read(seq, x.tickets[r], B == 1 && cuda_ != nullptr);
      x.waited = r + 1;
      x.read_wait_us += wall_us() - w0;
      if (tr != nullptr)
        tr->complete(lane_nvme_, "nvme read round (issue to landed)", x.issued_us[r], tr->now_us() - x.issued_us[r],
                     {{"blocks", x.rounds[r].size()}});
      if (!rs.ok()) return rs.with_context("decode step of layer " + std::to_string(layer) +
                                                           ": reading selected blocks");
      while (x.issued < x.rounds.size() && x.issued < r + 3) issue_round(seq, x);
      std::vector<std::vector<cpu::HostBlock>> round_lists(kvh);
      std::vector<storage::BlockPin> round_pins;
      for (uint32_t f : x.rounds[r]) {
        Result<storage::BlockPin> pin = pin_host(seq, f, x.rereads);
        if (!pin.ok()) return pin.status().with_context("decode step of layer " + std::to_string(layer));
        const uint32_t h = (f / seq.chunks_per_head_) % kvh;
        round_lists[h].push_back({reinterpret_cast<const bf16*>(pin->data()), C});
        round_pins.push_back(std::move(pin).value());
      }
      cpu::PartialState part = cpu::PartialState::empty(qh, d);
      engine_call([&] { cpu_.attend(q, round_lists, C, scale, part); });
      const cpu::PartialState two[2] = {std::move(x.host), std::move(part)};
      x.host = cpu::merge_states(std::span<const cpu::PartialState>(two, 2));
    }
    // Far field.
    std::vector<std::vector<uint32_t>> far(kvh);
    bool any_far = false;
    for (uint32_t h = 0; h < kvh; ++h) {
      far[h] = x.late_chunks[h];
      if (p.far_field == FarField::kSummary) {
        std::vector<uint32_t> sel = x.selected[h];
        std::sort(sel.begin(), sel.end());
        for (uint32_t c = x.ranges.far_begin; c < x.ranges.far_end; ++c)
          if (!std::binary_search(sel.begin(), sel.end(), c)) far[h].push_back(c);
      }
      any_far = any_far || !far[h].empty();
    }
    x.far = cpu::PartialState::empty(qh, d);
    if (any_far) engine_call([&] { cpu_.far_field(q, seq.summaries_[layer], far, scale, x.far); });
    x.cpu_attend_us += wall_us() - t0;
    // What this step attended (for verify()).
    cpu::AttendedSet& att = seq.last_attended_[layer];
    att.chunks.assign(kvh, {});
    att.far_field.assign(kvh, {});
    for (uint32_t h = 0; h < kvh; ++h) {
      std::vector<uint32_t>& a = att.chunks[h];
      for (const auto& [chunk, pin] : seq.hot_pins_[layer * kvh + h]) a.push_back(chunk);
      a.push_back(x.ranges.chunks - 1);
      std::vector<uint32_t> exact = x.selected[h];
      std::sort(x.late_chunks[h].begin(), x.late_chunks[h].end());
      for (uint32_t c : exact)
        if (!std::binary_search(x.late_chunks[h].begin(), x.late_chunks[h].end(), c)) a.push_back(c);
      std::sort(a.begin(), a.end());
      att.far_field[h] = far[h];
      std::sort(att.far_field[h].begin(), att.far_field[h].end());
    }
    return Status::ok_status();
  };

  auto gpu_step = [&]() -> Status {
  // 6. Uploaded blocks: wait for the copy engine, then the second GPU kernel.
  for (uint32_t b = 0; b < B; ++b) {
    SequenceKv& seq = *batch[b].seq;
    SeqStep& x = st[b];
    if (!x.has_upload) continue;
    const double t0 = wall_us();
    const Status us = seq.store_->wait(x.upload_ticket);
    stats_.upload_wait_us += wall_us() - t0;
    stats_.uploads_via_mover += seq.store_->stats().uploads_via_mover - x.mover_uploads_before;
    if (tr != nullptr)
      tr->complete(lane_copy_, "upload (issue to landed)", x.upload_issued_us, tr->now_us() - x.upload_issued_us,
                   {{"blocks", x.upload.size()}});
    if (!us.ok()) {
      return us.with_context("decode step of layer " + std::to_string(layer) + ": uploading selected blocks");
    }
    const std::vector<uint32_t> uploaded =
        seq.flat_blocks(layer, [&](uint32_t h) -> const auto& { return x.upload_chunks[h]; });
    std::vector<storage::BlockPin> up_pinned(uploaded.size());
    KVT_RETURN_IF_ERROR(seq.store_->pin_resident(uploaded, Tier::kGpu, up_pinned));
    size_t next = 0;
    for (uint32_t h = 0; h < kvh; ++h)
      for (size_t k = 0; k < x.upload_chunks[h].size(); ++k) {
        storage::BlockPin& pin = up_pinned[next++];
        if (!pin)
          return unavailable("decode step of layer " + std::to_string(layer) + ": the uploaded block of KV head " +
                             std::to_string(h) + ", chunk " + std::to_string(x.upload_chunks[h][k]) +
                             " was evicted before use; raise --gpu-bytes");
        x.select_on_gpu(h, slot_of(pin.data()), std::move(pin));
      }
  }
  bool any_sel = false;
  for (const SeqStep& x : st)
    for (const auto& l : x.gpu_sel) any_sel = any_sel || !l.empty();
  if (cuda_ != nullptr) {
    if (any_sel) {
      SlotLists l;
      for (uint32_t b = 0; b < B; ++b)
        for (uint32_t h = 0; h < kvh; ++h) {
          l.slots.insert(l.slots.end(), st[b].gpu_sel[h].begin(), st[b].gpu_sel[h].end());
          l.close_list(C);
        }
      KVT_RETURN_IF_ERROR(gpu_->attend(1, l, B, qh, kvh, arena, scale));
    }
    const double t0 = wall_us();
    KVT_RETURN_IF_ERROR(gpu_->finish());
    stats_.gpu_wait_us += wall_us() - t0;
    for (uint32_t b = 0; b < B; ++b) {
      for (int part = 0; part < 2; ++part) {
        cpu::PartialState& ps = part == 0 ? st[b].hot : st[b].sel;
        ps = cpu::PartialState::empty(qh, d);
        if (part == 1 && !any_sel) continue;
        std::copy_n(gpu_->o(part) + size_t{b} * qrow, qrow, ps.o.begin());
        std::copy_n(gpu_->lse(part) + size_t{b} * qh, qh, ps.lse.begin());
      }
    }
    if (tr != nullptr) {
      for (int part = 0; part < 2; ++part) {
        Result<std::pair<float, float>> span = gpu_->part_span_ms(part);
        if (span.ok() && span->second > span->first)
          tr->complete(lane_gpu_, part == 0 ? "decode kernel: sinks + window" : "decode kernel: selected blocks",
                       trace_origin + 1e3 * span->first, 1e3 * (span->second - span->first), {{"batch", B}});
      }
    }
  } else {
    // CPU stand-in: the same two partials from the stand-in slots.
    TraceScope scope(tr, lane_gpu_, "hot + selected attention (CPU stand-in)");
    const double t0 = wall_us();
    for (uint32_t b = 0; b < B; ++b) {
      SequenceKv& seq = *batch[b].seq;
      std::vector<std::vector<cpu::HostBlock>> hot(kvh), sel(kvh);
      const uint32_t tail_rows = static_cast<uint32_t>((st[b].tokens - 1) % C) + 1;
      for (uint32_t h = 0; h < kvh; ++h) {
        for (const auto& [chunk, pin] : seq.hot_pins_[layer * kvh + h])
          hot[h].push_back({reinterpret_cast<const bf16*>(pin.data()), C});
        hot[h].push_back({seq.tail(layer, h), tail_rows});
        for (const bf16* ptr : st[b].gpu_sel_ptr[h]) sel[h].push_back({ptr, C});
      }
      st[b].hot = cpu::PartialState::empty(qh, d);
      st[b].sel = cpu::PartialState::empty(qh, d);
      cpu_.attend(Bf16View<2>(batch[b].q, {qh, d}), hot, C, scale, st[b].hot);
      if (any_sel) cpu_.attend(Bf16View<2>(batch[b].q, {qh, d}), sel, C, scale, st[b].sel);
    }
    stats_.gpu_wait_us += wall_us() - t0;
  }
    return Status::ok_status();
  };

  // 7. Merge per sequence, once its CPU part and the GPU's are in.
  auto merge_one = [&](uint32_t b) {
    SeqStep& x = st[b];
    const cpu::PartialState parts[4] = {std::move(x.hot), std::move(x.sel), std::move(x.host), std::move(x.far)};
    const cpu::PartialState merged = cpu::merge_states(std::span<const cpu::PartialState>(parts, 4));
    std::copy(merged.o.begin(), merged.o.end(), batch[b].out.begin());
  };

  // The graph of the step (oneTBB flow graph on the CPU engine's threads):
  //   score[b] --all--> plan --> attend[b] ----------> merge[b]
  //                          \-> gpu (uploads, 2nd kernel) -/
  // The GPU's hot-set kernel is already running; the gpu node waits for the
  // copy engine and launches the second kernel while the CPU attends.
  std::vector<Status> status(B + 2);  // [b]: attend of b; [B]: plan; [B + 1]: gpu
  std::atomic<bool> failed{false};
  const auto guarded = [&](size_t slot, const std::function<Status()>& fn) {
    if (failed.load()) return;
    status[slot] = fn();
    if (!status[slot].ok()) failed = true;
  };
  warm.release();
  const double t_graph = wall_us();
  cpu_.run([&] {
    namespace flow = tbb::flow;
    using Node = flow::continue_node<flow::continue_msg>;
    flow::graph g;
    flow::broadcast_node<flow::continue_msg> start(g);
    Node plan_node(g, [&](const flow::continue_msg&) {
      const double t0 = wall_us();
      cpu::CpuEngine::WarmHold hold;
      if (options_.warm_workers) hold = cpu_.keep_warm(kWarmLimit);
      stats_.plan_warm_us += wall_us() - t0;
      guarded(B, plan_step);
      hold.release();  // before the attend nodes are spawned
      stats_.plan_us += wall_us() - t0;
    });
    Node gpu_node(g, [&](const flow::continue_msg&) { guarded(B + 1, gpu_step); });
    flow::make_edge(plan_node, gpu_node);
    std::vector<std::unique_ptr<Node>> nodes;
    for (uint32_t b = 0; b < B; ++b) {
      Node* score = nodes.emplace_back(std::make_unique<Node>(g, [&, b](const flow::continue_msg&) {
        if (!failed.load()) score_one(b);
      })).get();
      flow::make_edge(start, *score);
      flow::make_edge(*score, plan_node);
      Node* attend = nodes.emplace_back(std::make_unique<Node>(g, [&, b](const flow::continue_msg&) {
        guarded(b, [&] { return attend_one(b); });
      })).get();
      flow::make_edge(plan_node, *attend);
      Node* merge = nodes.emplace_back(std::make_unique<Node>(g, [&, b](const flow::continue_msg&) {
        if (!failed.load()) merge_one(b);
      })).get();
      flow::make_edge(*attend, *merge);
      flow::make_edge(gpu_node, *merge);
    }
    start.try_put(flow::continue_msg());
    g.wait_for_all();
  });
  stats_.graph_us += wall_us() - t_graph;
  for (const SeqStep& x : st) {
    stats_.score_us += x.score_us;
    stats_.cpu_attend_us += x.cpu_attend_us;
    stats_.cpu_kernel_us += x.cpu_kernel_us;
    stats_.cpu_calls += x.cpu_calls;
    stats_.read_wait_us += x.read_wait_us;
    stats_.reread_blocks += x.rereads;
  }
  if (failed.load()) {
    // Nothing this step started may outlive it unwaited, and no output is
    // produced. The sequences stay usable: no layer's token count advanced,
    // so a retry of the step writes the same token to the same row.
    Status first;
    for (const Status& e : status)
      if (!e.ok()) {
        first = e;
        break;
      }
    if (cuda_ != nullptr) (void)gpu_->finish();
    for (uint32_t b = 0; b < B; ++b) release_step(*batch[b].seq, st[b]);
    return first.with_context("decode step of layer " + std::to_string(layer));
  }

  // Write-back and bookkeeping (serial).
  {
    TraceScope scope(tr, lane_cpu_, "write-back + prefetch ahead");
    const double t0 = wall_us();
    for (uint32_t b = 0; b < B; ++b) {
      SequenceKv& seq = *batch[b].seq;
      SeqStep& x = st[b];
      seq.store_->release(x.gpu_pins);  // one lock for the step's selected blocks
      x.gpu_pins.clear();
      seq.layer_tokens_[layer] = x.tokens;
      if (x.completed) {
        // The tails of the heads are consecutive: they are the blocks to write.
        const uint32_t chunk = static_cast<uint32_t>((x.tokens - 1) / C);
        KVT_RETURN_IF_ERROR(write_completed(seq, layer, std::span<const uint32_t>(&chunk, 1), seq.tail(layer, 0)));
      }
      if (layer + 1 == s.layers) {
        seq.store_->set_sequence_tokens(x.tokens);
        seq.store_->set_step(x.tokens);
      }
      seq.last_selection_[layer] = std::move(x.selected);
      // Prefetch ahead: the next layer's previous selection into host staging,
      // where this step's reads have not already put it.
      const uint32_t next = layer + 1 == s.layers ? 0 : layer + 1;
      std::vector<uint32_t> next_flat, ahead;
      for (uint32_t h = 0; h < kvh; ++h)
        for (uint32_t c : seq.last_selection_[next][h]) next_flat.push_back(seq.flat(next, h, c));
      std::vector<Tier> where(next_flat.size());
      seq.store_->residency(next_flat, where);
      for (size_t i = 0; i < next_flat.size(); ++i)
        if (where[i] == Tier::kNvme && seq.reading_.count(next_flat[i]) == 0) ahead.push_back(next_flat[i]);
      if (!ahead.empty() && !issue_optional_read(seq, ahead)) stats_.ahead_reads_dropped += ahead.size();
    }
    stats_.merge_us += wall_us() - t0;
  }
  ++stats_.layer_steps;
  stats_.decode_us += wall_us() - t_step;
  return Status::ok_status();
}

}  // namespace kvtier::scheduler
