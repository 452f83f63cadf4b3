// The layer-step planner against hand-computed counts and schedules: chunk
// ranges of a 1M-token context, every selected block placed exactly once, the
// CPU/GPU split balanced and bounded by free GPU slots, late blocks only under
// the summary policy, write-back off the critical path, and bad input named.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "kvtier/scheduler/planner.h"
#include "random.h"

using namespace kvtier;
using namespace kvtier::scheduler;

namespace {

constexpr uint64_t kBlockBytes = 2 * 64 * 128 * 2;  // Llama-3.1-8B shape, 64-token chunks

CostRates h200_like() {
  CostRates r;
  r.gpu_attend_gbps = 3500;
  r.cpu_attend_gbps = 85;
  r.cpu_score_gbps = 80;
  r.cpu_topk_gbps = 3;
  r.h2d_gbps = 48;
  r.d2h_gbps = 48;
  r.nvme_read_gbps = 6;
  r.nvme_write_gbps = 5;
  r.nvme_latency_us = 80;
  r.launch_us = 5;
  return r;
}

// One sequence of `tokens` whose KV heads each select `per_head` distinct far
// chunks, spread evenly over the far range, all with residency `where`.
SequenceStep sequence(uint64_t tokens, uint32_t per_head, Residency where, uint32_t kv_heads = 8) {
  SequenceStep s;
  s.context_tokens = tokens;
  const uint32_t far_begin = 2, range = static_cast<uint32_t>((tokens - 4096) / 64) - far_begin;
  REQUIRE(range >= per_head);
  const uint32_t spacing = per_head == 0 ? 1 : range / per_head;
  for (uint32_t h = 0; h < kv_heads; ++h) {
    auto& list = s.selected.emplace_back();
    // h + i * spacing for i < per_head spans less than `range`, so the chunks are distinct mod range.
    for (uint32_t i = 0; i < per_head; ++i) list.push_back({far_begin + (h + i * spacing) % range, where});
  }
  return s;
}

PlanInputs inputs(const std::vector<SequenceStep>& batch) {
  PlanInputs in;
  in.shape = llama31_8b_shape();
  in.batch = batch;
  in.rates = h200_like();
  in.upload_slots_free = 1u << 20;
  return in;
}

LayerPlan plan_ok(const PlanInputs& in) {
  Result<LayerPlan> p = plan_layer(in);
  INFO(p.status().to_string());
  REQUIRE(p.ok());
  return std::move(p).value();
}

// Every selected chunk appears once among gpu/upload/cpu/late of its head,
// reads are a subset of cpu + late, and the task graph is in order.
void check_invariants(const PlanInputs& in, const LayerPlan& p) {
  REQUIRE(p.heads.size() == in.batch.size() * in.shape.kv_heads);
  for (size_t s = 0; s < in.batch.size(); ++s)
    for (uint32_t h = 0; h < in.shape.kv_heads; ++h) {
      const HeadPlan& hp = p.heads[s * in.shape.kv_heads + h];
      std::map<uint32_t, int> seen;
      for (const auto* list : {&hp.gpu, &hp.upload, &hp.cpu, &hp.late})
        for (uint32_t c : *list) ++seen[c];
      CHECK(seen.size() == in.batch[s].selected[h].size());
      for (const SelectedBlock& b : in.batch[s].selected[h]) CHECK(seen[b.chunk] == 1);
      for (uint32_t c : hp.read)
        CHECK((std::count(hp.cpu.begin(), hp.cpu.end(), c) + std::count(hp.late.begin(), hp.late.end(), c)) == 1);
    }
  for (size_t i = 0; i < p.tasks.size(); ++i) {
    for (uint32_t a : p.tasks[i].after) CHECK(a < i);
    CHECK(p.tasks[i].cost_us >= 0);
  }
  std::vector<double> finish;
  CHECK(lane_schedule(p.tasks, finish) == doctest::Approx(p.estimated_us));
}

size_t count_kind(const LayerPlan& p, TaskKind kind) {
  return std::count_if(p.tasks.begin(), p.tasks.end(), [&](const Task& t) { return t.kind == kind; });
}

const Task& only(const LayerPlan& p, TaskKind kind) {
  REQUIRE(count_kind(p, kind) == 1);
  return *std::find_if(p.tasks.begin(), p.tasks.end(), [&](const Task& t) { return t.kind == kind; });
}

}  // namespace

TEST_CASE("planner: a 1M-token context has 66 hot chunks per KV head and 16318 far ones to score") {
  const std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kGpu)};
  const PlanInputs in = inputs(batch);
  const LayerPlan p = plan_ok(in);
  check_invariants(in, p);
  // Sinks: chunks 0-1 (128 tokens); window: chunks 16320-16383 (4096 tokens).
  CHECK(p.hot_bytes == 66ull * 8 * kBlockBytes);
  CHECK(only(p, TaskKind::kScore).bytes == 16318ull * 8 * 128 * 2);  // bf16 mean keys (the default)
  CHECK(only(p, TaskKind::kGpuAttendSelected).blocks == 64 * 8);
  CHECK(count_kind(p, TaskKind::kUpload) == 0);
  CHECK(count_kind(p, TaskKind::kCpuAttend) == 0);
  CHECK(count_kind(p, TaskKind::kNvmeRead) == 0);
  CHECK(p.late_blocks == 0);
  // The hot-set kernel needs no selection: only the prepare step runs before it.
  const Task& hot = only(p, TaskKind::kGpuAttendHot);
  REQUIRE(hot.after.size() == 1);
  CHECK(p.tasks[hot.after[0]].kind == TaskKind::kPrepare);
}

TEST_CASE("planner: the executor's host time lies on the critical path") {
  const std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kGpu)};
  PlanInputs in = inputs(batch);
  const LayerPlan without = plan_ok(in);
  in.rates.host_list_us = 10;
  in.rates.host_block_us = 0.5;
  in.rates.host_step_us = 100;
  const LayerPlan with = plan_ok(in);
  check_invariants(in, with);
  CHECK(only(with, TaskKind::kPrepare).cost_us == doctest::Approx(8 * 10.0));
  // The plan node is its residency census, then the rest (under kWait, the
  // default, NVMe reads go out between the two).
  REQUIRE(count_kind(with, TaskKind::kPlan) == 2);
  const auto plan_task = std::find_if(with.tasks.begin(), with.tasks.end(), [](const Task& t) { return t.kind == TaskKind::kPlan; });
  const Task& census = *plan_task;
  const Task& rest = *std::find_if(plan_task + 1, with.tasks.end(), [](const Task& t) { return t.kind == TaskKind::kPlan; });
  CHECK(census.cost_us == doctest::Approx(512 * 0.5 * kPlanCensusShare));
  CHECK(rest.cost_us == doctest::Approx(512 * 0.5 * (1 - kPlanCensusShare)));
  CHECK(rest.blocks == 512);
  REQUIRE(rest.after.size() == 1);
  CHECK(&with.tasks[rest.after[0]] == &census);
  CHECK(only(with, TaskKind::kFinish).cost_us == doctest::Approx(100.0));
  // Scoring 1M tokens' summaries (~420 us) outlasts the hot-set kernel, so
  // prepare -> score -> top-k -> plan -> attend -> merge -> finish is the
  // critical path and each host term adds to the step once.
  CHECK(with.estimated_us == doctest::Approx(without.estimated_us + 80 + 256 + 100));
  // Nothing but the prepare step precedes scoring; every device task after top-k waits for the plan.
  CHECK(only(with, TaskKind::kScore).after.size() == 1);
  CHECK(only(with, TaskKind::kGpuAttendSelected).after.size() == 2);
  in.rates.host_block_us = -1;
  CHECK(plan_layer(in).status().message().find("host_block_us = -1") != std::string::npos);
}

TEST_CASE("planner: GPU scoring runs on the GPU lane ahead of the hot set, and top-k waits for the download") {
  const std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kGpu)};
  PlanInputs in = inputs(batch);
  const LayerPlan cpu = plan_ok(in);
  in.score_on_gpu = true;
  const LayerPlan gpu = plan_ok(in);
  check_invariants(in, gpu);
  const uint64_t summary = 16318ull * 8 * 128 * 2, scores = 16318ull * 8 * 4;
  const Task& score = only(gpu, TaskKind::kScore);
  CHECK(score.lane == Lane::kGpu);
  CHECK(only(cpu, TaskKind::kScore).lane == Lane::kCpu);
  CHECK(score.bytes == summary);
  CHECK(score.cost_us == doctest::Approx(5 + summary / 3500e3));
  // Download (a launch and 4 bytes a block at d2h_gbps), then the ranking at cpu_topk_gbps.
  CHECK(only(gpu, TaskKind::kTopk).cost_us == doctest::Approx(5 + scores / 48e3 + scores / 3e3));
  CHECK(only(cpu, TaskKind::kTopk).cost_us == doctest::Approx(scores / 3e3));
  // The hot set waits its turn behind the scoring kernel on the GPU lane.
  std::vector<double> finish;
  lane_schedule(gpu.tasks, finish);
  const auto index = [&](TaskKind k) {
    return static_cast<size_t>(std::find_if(gpu.tasks.begin(), gpu.tasks.end(), [&](const Task& t) { return t.kind == k; }) -
                               gpu.tasks.begin());
  };
  CHECK(finish[index(TaskKind::kGpuAttendHot)] ==
        doctest::Approx(finish[index(TaskKind::kScore)] + only(gpu, TaskKind::kGpuAttendHot).cost_us));
  // ~420 us of CPU scoring become ~6 us of HBM and ~8 us of download: the step is shorter by about the difference.
  CHECK(gpu.estimated_us < cpu.estimated_us - 300);
}

TEST_CASE("planner: host blocks are split so that the CPU and the GPU paths end together") {
  const std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kHost)};
  PlanInputs in = inputs(batch);
  const LayerPlan p = plan_ok(in);
  check_invariants(in, p);
  const uint32_t up = only(p, TaskKind::kUpload).blocks;
  const uint32_t cpu = only(p, TaskKind::kCpuAttend).blocks;
  CHECK(up + cpu == 512);
  CHECK(up > 0);
  CHECK(cpu > 0);
  // Balanced: per block the CPU takes 0.39 us, the upload + GPU 0.69 us, so
  // the CPU gets about 64% of the blocks.
  CHECK(std::abs(static_cast<double>(cpu) / 512 - 0.64) < 0.05);
  // The split beats both extremes.
  PlanInputs no_slots = in;
  no_slots.upload_slots_free = 0;
  const LayerPlan all_cpu = plan_ok(no_slots);
  check_invariants(no_slots, all_cpu);
  CHECK(count_kind(all_cpu, TaskKind::kUpload) == 0);
  CHECK(only(all_cpu, TaskKind::kCpuAttend).blocks == 512);
  CHECK(p.estimated_us < all_cpu.estimated_us);
  // Uploads never exceed the free slots.
  PlanInputs few = in;
  few.upload_slots_free = 10;
  const LayerPlan capped = plan_ok(few);
  CHECK(only(capped, TaskKind::kUpload).blocks == 10);
  CHECK(p.estimated_us <= capped.estimated_us);
}

TEST_CASE("planner: each in-step CPU attention call costs cpu_call_us on top of its bytes") {
  // Host blocks, all on the CPU: one call.
  std::vector<SequenceStep> host{sequence(1u << 20, 64, Residency::kHost)};
  PlanInputs in = inputs(host);
  in.upload_slots_free = 0;
  const LayerPlan base = plan_ok(in);
  in.rates.cpu_call_us = 40;
  const LayerPlan called = plan_ok(in);
  check_invariants(in, called);
  CHECK(only(called, TaskKind::kCpuAttend).cost_us ==
        doctest::Approx(only(base, TaskKind::kCpuAttend).cost_us + 40));
  CHECK(called.estimated_us == doctest::Approx(base.estimated_us + 40));
  // NVMe blocks waited for: one call per round of kReadRoundBlocks landed reads.
  std::vector<SequenceStep> nvme{sequence(1u << 20, 64, Residency::kNvme)};
  PlanInputs rn = inputs(nvme);
  rn.late = LatePolicy::kWait;
  const LayerPlan rbase = plan_ok(rn);
  rn.rates.cpu_call_us = 40;
  const LayerPlan rcalled = plan_ok(rn);
  check_invariants(rn, rcalled);
  CHECK(only(rcalled, TaskKind::kCpuAttend).cost_us ==
        doctest::Approx(only(rbase, TaskKind::kCpuAttend).cost_us + 40.0 * (512 / kReadRoundBlocks)));
  // Reads in flight from earlier steps are attended in one more call (there
  // is no host call to join), then this step's reads in rounds.
  for (uint32_t i = 0; i < 4; ++i) nvme[0].selected[0][i].where = Residency::kNvmeReading;
  rn.rates.cpu_call_us = 0;
  const LayerPlan ebase = plan_ok(rn);
  rn.rates.cpu_call_us = 40;
  const LayerPlan early = plan_ok(rn);
  check_invariants(rn, early);
  const double rounds = (512 - 4 + kReadRoundBlocks - 1) / kReadRoundBlocks;
  CHECK(only(early, TaskKind::kCpuAttend).cost_us ==
        doctest::Approx(only(ebase, TaskKind::kCpuAttend).cost_us + 40.0 * (1 + rounds)));
  rn.rates.cpu_call_us = -1;
  CHECK(plan_layer(rn).status().message().find("cpu_call_us = -1") != std::string::npos);
}

TEST_CASE("planner: a call cost large enough sends every host block up rather than to the CPU") {
  const std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kHost)};
  PlanInputs in = inputs(batch);
  const LayerPlan cheap = plan_ok(in);
  REQUIRE(count_kind(cheap, TaskKind::kCpuAttend) == 1);  // the split keeps some on the CPU
  in.rates.cpu_call_us = 1e6;  // a call costs more than uploading everything
  const LayerPlan costly = plan_ok(in);
  check_invariants(in, costly);
  CHECK(count_kind(costly, TaskKind::kCpuAttend) == 0);
  CHECK(only(costly, TaskKind::kUpload).blocks == 512);
}

TEST_CASE("planner: NVMe blocks are waited for, or late and summarised under the summary policy") {
  std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kNvme)};
  // A few already in flight from a previous step's prefetch.
  for (uint32_t i = 0; i < 4; ++i) batch[0].selected[0][i].where = Residency::kNvmeReading;
  PlanInputs in = inputs(batch);

  in.late = LatePolicy::kWait;
  const LayerPlan wait = plan_ok(in);
  check_invariants(in, wait);
  CHECK(wait.late_blocks == 0);
  const Task& read = only(wait, TaskKind::kNvmeRead);
  CHECK(read.blocks == 512 - 4);  // in-flight reads are not issued again
  CHECK(wait.nvme_read_bytes == (512 - 4) * kBlockBytes);
  CHECK(wait.heads[0].read.size() == 60);
  CHECK(wait.heads[0].cpu.size() == 64);
  // The reads go out after the plan node's census, before the rest of it
  // (ExecutorOptions::early_reads): with a slow plan node the step is
  // shorter by the rest of the node than if they waited for all of it.
  REQUIRE(read.after.size() == 1);
  const Task& census = wait.tasks[read.after[0]];
  CHECK(census.kind == TaskKind::kPlan);
  CHECK(census.blocks == 0);
  PlanInputs slow = in;
  slow.late = LatePolicy::kWait;
  slow.rates.host_block_us = 2;  // a 1 ms plan node for 512 blocks
  const LayerPlan early = plan_ok(slow);
  check_invariants(slow, early);
  LayerPlan after_node = early;  // the same plan with the read issued after the whole node
  const auto last_plan = std::find_if(after_node.tasks.rbegin(), after_node.tasks.rend(),
                                      [](const Task& t) { return t.kind == TaskKind::kPlan; });
  const uint32_t node = static_cast<uint32_t>(after_node.tasks.rend() - last_plan - 1);
  for (Task& t : after_node.tasks)
    if (t.kind == TaskKind::kNvmeRead) t.after = {node};
  std::vector<double> finish;
  const double later = lane_schedule(after_node.tasks, finish);
  CHECK(later - early.estimated_us == doctest::Approx(512 * 2 * (1 - kPlanCensusShare)).epsilon(0.01));
  // With early reads off (ExecutorOptions::early_reads) the node is one task
  // and the reads follow all of it, as the edited plan above does.
  slow.early_reads = false;
  const LayerPlan whole = plan_ok(slow);
  check_invariants(slow, whole);
  CHECK(count_kind(whole, TaskKind::kPlan) == 1);
  CHECK(whole.tasks[only(whole, TaskKind::kNvmeRead).after[0]].kind == TaskKind::kPlan);
  CHECK(whole.estimated_us == doctest::Approx(later));

  in.late = LatePolicy::kSummary;
  const LayerPlan summary = plan_ok(in);
  check_invariants(in, summary);
  // 508 reads at 6 GB/s take ~2.8 ms; the rest of the step takes ~0.4 ms.
  CHECK(summary.late_blocks > 400);
  CHECK(summary.late_blocks <= 512);
  // Reads still go out for later steps: those this step attends first, the
  // late ones after them in the background, which the step does not wait for.
  uint32_t timely = 0, background = 0;
  double nvme_busy = 0;
  for (const Task& t : summary.tasks) {
    if (t.kind != TaskKind::kNvmeRead) continue;
    (t.background ? background : timely) += t.blocks;
    nvme_busy += t.cost_us;
  }
  CHECK(timely + background == 512 - 4);
  CHECK(background == std::min<uint32_t>(512 - 4, summary.late_blocks));
  CHECK(nvme_busy > 2500);
  CHECK(summary.estimated_us < 1000);  // the step ends long before the drive does
  CHECK(summary.estimated_us < wait.estimated_us);
  uint32_t late = 0;
  for (const HeadPlan& h : summary.heads) late += static_cast<uint32_t>(h.late.size());
  CHECK(late == summary.late_blocks);
}

TEST_CASE("planner: a batch of sequences of different lengths is planned as a whole") {
  const std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kGpu), sequence(131072, 64, Residency::kHost),
                                        sequence(300000, 32, Residency::kGpu)};
  const PlanInputs in = inputs(batch);
  const LayerPlan p = plan_ok(in);
  check_invariants(in, p);
  // Hot chunks: 2 sinks + 64 window, whatever the length (lengths here are multiples of 64
  // or leave a partial tail chunk, which counts as a block).
  const uint64_t hot = 66 + 66 + (2 + (300000 + 63) / 64 - (300000 - 4096) / 64);
  CHECK(p.hot_bytes == hot * 8 * kBlockBytes);
  const uint64_t far = (16320 - 2) + (2048 - 64 - 2) + ((300000 - 4096) / 64 - 2);
  CHECK(only(p, TaskKind::kScore).bytes == far * 8 * 128 * 2);  // bf16 mean keys
  CHECK(only(p, TaskKind::kGpuAttendSelected).blocks + only(p, TaskKind::kCpuAttend).blocks == 64 * 8 * 2 + 32 * 8);
}

TEST_CASE("planner: completed tail blocks are written home off the critical path") {
  std::vector<SequenceStep> batch{sequence(1u << 20, 64, Residency::kGpu)};
  batch[0].tail_block_completed = true;
  batch[0].tail_home_on_nvme = true;
  const PlanInputs in = inputs(batch);
  const LayerPlan p = plan_ok(in);
  check_invariants(in, p);
  CHECK(count_kind(p, TaskKind::kWriteBack) == 2);
  for (const Task& t : p.tasks)
    for (uint32_t a : t.after) {
      const bool ok = p.tasks[a].kind != TaskKind::kWriteBack || t.kind == TaskKind::kWriteBack;
      CHECK(ok);  // only a write-back waits for a write-back
    }
  const Task& merge = only(p, TaskKind::kMerge);
  for (uint32_t a : merge.after) CHECK(p.tasks[a].kind != TaskKind::kWriteBack);
}

TEST_CASE("planner: random batches keep every invariant") {
  auto gen = test::rng(0x91a2);
  std::uniform_int_distribution<int> where(0, 3), per(0, 64);
  std::uniform_int_distribution<uint64_t> tokens(8192, 1u << 20);
  for (int round = 0; round < 50; ++round) {
    std::vector<SequenceStep> batch;
    const int n = 1 + round % 5;
    for (int s = 0; s < n; ++s) {
      const uint64_t t = tokens(gen);
      SequenceStep seq = sequence(t, static_cast<uint32_t>(per(gen)), Residency::kHost);
      for (auto& list : seq.selected)
        for (SelectedBlock& b : list) b.where = static_cast<Residency>(where(gen));
      seq.tail_block_completed = round % 3 == 0;
      batch.push_back(std::move(seq));
    }
    PlanInputs in = inputs(batch);
    in.late = round % 2 ? LatePolicy::kSummary : LatePolicy::kWait;
    in.upload_slots_free = static_cast<uint32_t>(round * 7);
    const LayerPlan p = plan_ok(in);
    check_invariants(in, p);
    CHECK(p.uploaded_bytes <= uint64_t{in.upload_slots_free} * kBlockBytes);
    if (in.late == LatePolicy::kWait) CHECK(p.late_blocks == 0);
  }
}

TEST_CASE("planner: lane_schedule runs each lane in order and waits for dependencies") {
  std::vector<Task> tasks(4);
  tasks[0] = {TaskKind::kScore, Lane::kCpu, 0, 0, 10, {}};
  tasks[1] = {TaskKind::kGpuAttendHot, Lane::kGpu, 0, 0, 4, {}};
  tasks[2] = {TaskKind::kGpuAttendSelected, Lane::kGpu, 0, 0, 3, {0}};  // waits for the CPU: starts at 10
  tasks[3] = {TaskKind::kCpuAttend, Lane::kCpu, 0, 0, 5, {1}};         // CPU free at 10
  std::vector<double> finish;
  CHECK(lane_schedule(tasks, finish) == 15);
  CHECK(finish == std::vector<double>{10, 4, 13, 15});
  // A background task holds its lane but does not end the step.
  tasks.push_back({TaskKind::kNvmeRead, Lane::kNvme, 0, 0, 50, {0}, true});
  tasks.push_back({TaskKind::kNvmeRead, Lane::kNvme, 0, 0, 1, {}});  // queued behind it on the drive
  CHECK(lane_schedule(tasks, finish) == 61);
  CHECK(finish[4] == 60);
  tasks[5].background = true;
  CHECK(lane_schedule(tasks, finish) == 15);
}

TEST_CASE("planner: bad input is named") {
  std::vector<SequenceStep> batch{sequence(1u << 20, 4, Residency::kHost)};
  PlanInputs in = inputs(batch);
  auto message = [&](const PlanInputs& x) { return plan_layer(x).status().to_string(); };

  batch[0].selected[3][1].chunk = 16330;  // in the window
  CHECK(message(in).find("KV head 3 selects chunk 16330, outside the far range [2, 16320)") != std::string::npos);
  batch[0].selected[3][1].chunk = 1;  // a sink
  CHECK(message(in).find("chunk 1") != std::string::npos);
  batch[0].selected[3][1] = batch[0].selected[3][0];
  CHECK(message(in).find("selects a chunk twice") != std::string::npos);
  batch[0] = sequence(1u << 20, 4, Residency::kHost);

  batch[0].selected.pop_back();
  CHECK(message(in).find("selections for 7 KV heads; the shape has 8") != std::string::npos);
  batch[0] = sequence(1u << 20, 4, Residency::kHost);

  PlanInputs bad = in;
  bad.rates.h2d_gbps = 0;
  CHECK(message(bad).find("h2d_gbps = 0") != std::string::npos);
  bad = in;
  bad.rates.nvme_latency_us = -1;
  CHECK(message(bad).find("nvme_latency_us") != std::string::npos);
  bad = in;
  bad.layer = 32;
  CHECK(message(bad).find("layer") != std::string::npos);
  bad = in;
  bad.batch = {};
  CHECK(message(bad).find("batch is empty") != std::string::npos);

  CHECK(parse_late_policy("summary").value() == LatePolicy::kSummary);
  CHECK(parse_late_policy("wait").value() == LatePolicy::kWait);
  CHECK(parse_late_policy("skip").status().to_string().find("known: wait, summary") != std::string::npos);
}
