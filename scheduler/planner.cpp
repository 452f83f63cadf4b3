// The layer-step planner: counts what each device must move and compute,
// splits host-resident selected blocks between the CPU and the GPU by the
// cost model, decides late blocks, and emits the task graph (planner.h).
#include "kvtier/scheduler/planner.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <string>

namespace kvtier::scheduler {
namespace {

constexpr const char* kWhat = "plan_layer";

// Microseconds to move `bytes` at `gbps` (1e9 bytes/s): bytes / (gbps * 1e3).
double us_for(uint64_t bytes, double gbps) { return static_cast<double>(bytes) / (gbps * 1e3); }


Status check_inputs(const PlanInputs& in) {
  KVT_RETURN_IF_ERROR(validate(in.shape));
  KVT_RETURN_IF_ERROR(validate(in.policy));
  KVT_RETURN_IF_ERROR(validate(in.rates));
  if (in.layer >= in.shape.layers) return invalid_field(kWhat, "layer", in.layer, "is not a layer of the shape");
  if (in.batch.empty()) return invalid_argument("plan_layer: the batch is empty");
  for (size_t s = 0; s < in.batch.size(); ++s) {
    const SequenceStep& seq = in.batch[s];
    const std::string who = "plan_layer: sequence " + std::to_string(s);
    if (seq.context_tokens == 0) return invalid_argument(who + " has no tokens");
    if (seq.selected.size() != in.shape.kv_heads)
      return invalid_argument(who + " lists selections for " + std::to_string(seq.selected.size()) +
                              " KV heads; the shape has " + std::to_string(in.shape.kv_heads));
    const ChunkRanges r = chunk_ranges(in.policy, seq.context_tokens);
    for (uint32_t h = 0; h < in.shape.kv_heads; ++h) {
      std::vector<uint32_t> chunks;
      for (const SelectedBlock& b : seq.selected[h]) {
        if (b.chunk < r.far_begin || b.chunk >= r.far_end)
          return invalid_argument(who + " KV head " + std::to_string(h) + " selects chunk " + std::to_string(b.chunk) +
                                  ", outside the far range [" + std::to_string(r.far_begin) + ", " +
                                  std::to_string(r.far_end) + ") (sinks and window are always attended)");
        chunks.push_back(b.chunk);
      }
      std::sort(chunks.begin(), chunks.end());
      if (std::adjacent_find(chunks.begin(), chunks.end()) != chunks.end())
        return invalid_argument(who + " KV head " + std::to_string(h) + " selects a chunk twice");
    }
  }
  return Status::ok_status();
}

// Selected blocks of the whole batch by residency, as (head plan index, chunk).
struct Candidate {
  uint32_t head = 0;
  uint32_t chunk = 0;
};
struct Census {
  std::vector<Candidate> host, nvme, reading;
  uint32_t gpu = 0;
  uint64_t hot_blocks = 0, far_blocks = 0;
  uint32_t completed = 0, completed_to_nvme = 0;
};

Census take_census(const PlanInputs& in, std::vector<HeadPlan>& heads) {
  Census c;
  const uint32_t kv = in.shape.kv_heads;
  heads.assign(in.batch.size() * kv, HeadPlan{});
  for (size_t s = 0; s < in.batch.size(); ++s) {
    const SequenceStep& seq = in.batch[s];
    const ChunkRanges r = chunk_ranges(in.policy, seq.context_tokens);
    c.hot_blocks += uint64_t{r.hot()} * kv;
    c.far_blocks += uint64_t{r.far_end - r.far_begin} * kv;
    c.completed += seq.tail_block_completed ? kv : 0;
    c.completed_to_nvme += seq.tail_block_completed && seq.tail_home_on_nvme ? kv : 0;
    for (uint32_t h = 0; h < kv; ++h) {
      const uint32_t head = static_cast<uint32_t>(s * kv + h);
      for (const SelectedBlock& b : seq.selected[h]) {
        switch (b.where) {
          case Residency::kGpu: heads[head].gpu.push_back(b.chunk), ++c.gpu; break;
          case Residency::kHost: c.host.push_back({head, b.chunk}); break;
          case Residency::kNvme: c.nvme.push_back({head, b.chunk}); break;
          case Residency::kNvmeReading: c.reading.push_back({head, b.chunk}); break;
        }
      }
    }
  }
  return c;
}

// The modeled times of the two attention paths for a given upload count.
struct Timeline {
  double topk_end = 0;  // scoring and top-k done: the selection is known
  double hot_end = 0;   // sinks + window attended on the GPU
  double per_block_cpu = 0, per_block_h2d = 0, per_block_gpu = 0, launch = 0;
  double cpu_call = 0;  // one CPU attention call, when any host block stays on the CPU
  uint32_t host = 0, gpu_resident = 0;

  double gpu_end(uint32_t uploads) const {
    const double uploaded = topk_end + (uploads > 0 ? launch + uploads * per_block_h2d : 0);
    return std::max(hot_end, uploaded) + launch + (gpu_resident + uploads) * per_block_gpu;
  }
  double cpu_end(uint32_t uploads) const {
    return topk_end + (host > uploads ? cpu_call : 0.0) + (host - uploads) * per_block_cpu;
  }
  double end(uint32_t uploads) const { return std::max(gpu_end(uploads), cpu_end(uploads)); }
};

// The upload count that ends the two paths earliest; ties go to more uploads,
// which also leave the blocks cached on the GPU for the next steps.
uint32_t best_uploads(const Timeline& t, uint32_t max_uploads) {
  uint32_t best = 0;
  double best_end = t.end(0);
  for (uint32_t u = 1; u <= max_uploads; ++u) {
    const double e = t.end(u);
    if (e <= best_end) best = u, best_end = e;
  }
  return best;
}

// Appends a task and returns its index.
uint32_t add(LayerPlan& plan, TaskKind kind, Lane lane, uint64_t bytes, uint32_t blocks, double cost_us,
             std::vector<uint32_t> after) {
  plan.tasks.push_back(Task{kind, lane, bytes, blocks, cost_us, std::move(after)});
  return static_cast<uint32_t>(plan.tasks.size() - 1);
}

}  // namespace

uint64_t summary_row_bytes(const ModelShape& shape, SummaryKind kind) {
  const uint64_t f32_row = (uint64_t{shape.head_dim} + 15) / 16 * 16 * 4;
  switch (kind) {
    case SummaryKind::kMeanF32: return f32_row;
    case SummaryKind::kMeanBf16: return (uint64_t{shape.head_dim} + 31) / 32 * 32 * 2;
    case SummaryKind::kMinMaxF32: return 3 * f32_row;
  }
  return f32_row;
}

Status validate(const CostRates& r) {
  const std::array<std::pair<const char*, double>, 8> rates{{{"gpu_attend_gbps", r.gpu_attend_gbps},
                                                             {"cpu_attend_gbps", r.cpu_attend_gbps},
                                                             {"cpu_score_gbps", r.cpu_score_gbps},
                                                             {"cpu_topk_gbps", r.cpu_topk_gbps},
                                                             {"h2d_gbps", r.h2d_gbps},
                                                             {"d2h_gbps", r.d2h_gbps},
                                                             {"nvme_read_gbps", r.nvme_read_gbps},
                                                             {"nvme_write_gbps", r.nvme_write_gbps}}};
  for (const auto& [name, v] : rates)
    if (!std::isfinite(v) || v <= 0)
      return invalid_argument(std::string("cost rates: ") + name + " = " + std::to_string(v) + ": must be > 0");
  const std::array<std::pair<const char*, double>, 6> times{{{"nvme_latency_us", r.nvme_latency_us},
                                                             {"host_list_us", r.host_list_us},
                                                             {"host_block_us", r.host_block_us},
                                                             {"host_step_us", r.host_step_us},
                                                             {"cpu_call_us", r.cpu_call_us},
                                                             {"launch_us", r.launch_us}}};
  for (const auto& [name, v] : times)
    if (!std::isfinite(v) || v < 0)
      return invalid_argument(std::string("cost rates: ") + name + " = " + std::to_string(v) + ": must be >= 0");
  return Status::ok_status();
}

std::string_view late_policy_name(LatePolicy policy) { return policy == LatePolicy::kWait ? "wait" : "summary"; }

Result<LatePolicy> parse_late_policy(std::string_view text) {
  if (text == "wait") return LatePolicy::kWait;
  if (text == "summary") return LatePolicy::kSummary;
  return invalid_argument("late-block policy '" + std::string(text) + "' is unknown (known: wait, summary)");
}

std::string_view lane_name(Lane lane) {
  switch (lane) {
    case Lane::kCpu: return "cpu";
    case Lane::kGpu: return "gpu";
    case Lane::kCopyH2d: return "copy_h2d";
    case Lane::kCopyD2h: return "copy_d2h";
    case Lane::kNvme: return "nvme";
  }
  return "?";
}

std::string_view task_kind_name(TaskKind kind) {
  switch (kind) {
    case TaskKind::kScore: return "score";
    case TaskKind::kTopk: return "topk";
    case TaskKind::kGpuAttendHot: return "gpu_attend_hot";
    case TaskKind::kNvmeRead: return "nvme_read";
    case TaskKind::kUpload: return "upload";
    case TaskKind::kGpuAttendSelected: return "gpu_attend_selected";
    case TaskKind::kCpuAttend: return "cpu_attend";
    case TaskKind::kMerge: return "merge";
    case TaskKind::kWriteBack: return "write_back";
    case TaskKind::kPrepare: return "prepare";
    case TaskKind::kPlan: return "plan";
    case TaskKind::kFinish: return "finish";
  }
  return "?";
}

double lane_schedule(std::span<const Task> tasks, std::vector<double>& finish_us) {
  std::array<double, 5> lane_free{};
  finish_us.assign(tasks.size(), 0);
  double makespan = 0;
  for (size_t i = 0; i < tasks.size(); ++i) {
    double start = lane_free[static_cast<size_t>(tasks[i].lane)];
    for (uint32_t a : tasks[i].after) start = std::max(start, finish_us[a]);
    finish_us[i] = start + tasks[i].cost_us;
    lane_free[static_cast<size_t>(tasks[i].lane)] = finish_us[i];
    if (!tasks[i].background) makespan = std::max(makespan, finish_us[i]);
  }
  return makespan;
}

Result<LayerPlan> plan_layer(const PlanInputs& in) {
  KVT_RETURN_IF_ERROR(check_inputs(in));
  const CostRates& rt = in.rates;
  const uint64_t block_bytes = 2ull * in.policy.chunk_tokens * in.shape.head_dim * dtype_bytes(in.shape.dtype);
  LayerPlan plan;
  Census c = take_census(in, plan.heads);

  // The executor's host work before anything else: one append and hot-set
  // refresh per (sequence, KV head), which also launches the hot attention.
  const uint32_t lists = static_cast<uint32_t>(plan.heads.size());
  const uint32_t prepare = add(plan, TaskKind::kPrepare, Lane::kCpu, 0, 0, lists * rt.host_list_us, {});
  // Scoring reads every far block's summary; top-k reads the scores. On the
  // GPU the scores (4 bytes a block) come down before the CPU ranks them.
  const uint64_t score_bytes = c.far_blocks * summary_row_bytes(in.shape, in.policy.summary_kind);
  const uint64_t scores_bytes = c.far_blocks * 4;
  const uint32_t score =
      in.score_on_gpu
          ? add(plan, TaskKind::kScore, Lane::kGpu, score_bytes, 0, rt.launch_us + us_for(score_bytes, rt.gpu_attend_gbps),
                {prepare})
          : add(plan, TaskKind::kScore, Lane::kCpu, score_bytes, 0, us_for(score_bytes, rt.cpu_score_gbps), {prepare});
  const double download_us = in.score_on_gpu ? rt.launch_us + us_for(scores_bytes, rt.d2h_gbps) : 0.0;
  const uint32_t topk = add(plan, TaskKind::kTopk, Lane::kCpu, scores_bytes, 0,
                            download_us + us_for(scores_bytes, rt.cpu_topk_gbps), {score});
  plan.hot_bytes = c.hot_blocks * block_bytes;
  const uint32_t hot = add(plan, TaskKind::kGpuAttendHot, Lane::kGpu, plan.hot_bytes, static_cast<uint32_t>(c.hot_blocks),
                           rt.launch_us + us_for(plan.hot_bytes, rt.gpu_attend_gbps), {prepare});
  // The plan node: where each selected block is, the plan, pins, I/O issue.
  // Under kWait the executor reads the blocks found only on NVMe as soon as
  // it knows where every block is (the census, the node's first part).
  const uint32_t selected = c.gpu + static_cast<uint32_t>(c.host.size() + c.nvme.size() + c.reading.size());
  const double plan_us = selected * rt.host_block_us;
  const bool early_reads = in.late == LatePolicy::kWait && in.early_reads;
  const uint32_t census =
      early_reads ? add(plan, TaskKind::kPlan, Lane::kCpu, 0, 0, plan_us * kPlanCensusShare, {topk}) : topk;
  const uint32_t planned = add(plan, TaskKind::kPlan, Lane::kCpu, 0, selected,
                               early_reads ? plan_us * (1 - kPlanCensusShare) : plan_us, {census});

  Timeline t;
  t.topk_end = plan.tasks[prepare].cost_us + plan.tasks[score].cost_us + plan.tasks[topk].cost_us + plan_us;
  // The hot set queues behind the scoring kernel on the GPU.
  t.hot_end = plan.tasks[prepare].cost_us + (in.score_on_gpu ? plan.tasks[score].cost_us : 0.0) +
              plan.tasks[hot].cost_us;
  t.per_block_cpu = us_for(block_bytes, rt.cpu_attend_gbps);
  t.per_block_h2d = us_for(block_bytes, rt.h2d_gbps);
  t.per_block_gpu = us_for(block_bytes, rt.gpu_attend_gbps);
  t.launch = rt.launch_us;
  t.cpu_call = rt.cpu_call_us;
  t.host = static_cast<uint32_t>(c.host.size());
  t.gpu_resident = c.gpu;
  const uint32_t uploads = best_uploads(t, std::min<uint32_t>(t.host, in.upload_slots_free));
  // Which host blocks go up: the last `uploads` of the census (any choice
  // balances the same; the executor may prefer blocks it expects to reuse).
  for (size_t i = 0; i < c.host.size(); ++i) {
    HeadPlan& h = plan.heads[c.host[i].head];
    (i + uploads >= c.host.size() ? h.upload : h.cpu).push_back(c.host[i].chunk);
  }

  // NVMe: new reads go out once the selection is known. A block whose read
  // cannot land (and be attended) before the rest of the step ends is late
  // under kSummary; under kWait the step waits for it.
  const double rest_end = t.end(uploads);
  const double per_read = us_for(block_bytes, rt.nvme_read_gbps) + t.per_block_cpu;
  uint32_t in_time = static_cast<uint32_t>(c.nvme.size() + c.reading.size());
  if (in.late == LatePolicy::kSummary) {
    const double room = rest_end - t.topk_end - rt.nvme_latency_us;
    in_time = room <= 0 ? 0 : std::min<uint32_t>(in_time, static_cast<uint32_t>(room / per_read));
  }
  // In-flight reads land first (they were issued earlier), then new ones in order.
  std::vector<Candidate> pending = c.reading;
  pending.insert(pending.end(), c.nvme.begin(), c.nvme.end());
  for (size_t i = 0; i < pending.size(); ++i) {
    HeadPlan& h = plan.heads[pending[i].head];
    (i < in_time ? h.cpu : h.late).push_back(pending[i].chunk);
    if (i >= c.reading.size()) h.read.push_back(pending[i].chunk);
  }
  plan.late_blocks = static_cast<uint32_t>(pending.size() - in_time);
  const uint32_t new_reads = static_cast<uint32_t>(c.nvme.size());
  plan.nvme_read_bytes = uint64_t{new_reads} * block_bytes;
  // The reads this step attends go first; those of late blocks follow in the
  // background (the drive is busy with them, the step does not wait).
  // (New reads are the tail of `pending`, so the late ones are new first.)
  const uint32_t late_reads = std::min(new_reads, plan.late_blocks);
  const uint32_t timely_reads = new_reads - late_reads;
  const auto add_read = [&](uint32_t blocks) {
    const uint64_t bytes = uint64_t{blocks} * block_bytes;
    return add(plan, TaskKind::kNvmeRead, Lane::kNvme, bytes, blocks,
               rt.nvme_latency_us + us_for(bytes, rt.nvme_read_gbps), {early_reads ? census : planned});
  };
  // Without late reads, reads only in flight still cost this step their latency.
  std::vector<uint32_t> read_tasks;
  if (timely_reads > 0 || (late_reads == 0 && !pending.empty())) read_tasks.push_back(add_read(timely_reads));
  if (late_reads > 0) plan.tasks[add_read(late_reads)].background = true;

  std::vector<uint32_t> merge_after{hot};
  if (uploads > 0 || c.gpu > 0) {
    std::vector<uint32_t> after{hot, planned};
    if (uploads > 0) {
      plan.uploaded_bytes = uint64_t{uploads} * block_bytes;
      after.push_back(add(plan, TaskKind::kUpload, Lane::kCopyH2d, plan.uploaded_bytes, uploads,
                          rt.launch_us + us_for(plan.uploaded_bytes, rt.h2d_gbps), {planned}));
    }
    const uint64_t bytes = uint64_t{c.gpu + uploads} * block_bytes;
    merge_after.push_back(add(plan, TaskKind::kGpuAttendSelected, Lane::kGpu, bytes, c.gpu + uploads,
                              rt.launch_us + us_for(bytes, rt.gpu_attend_gbps), std::move(after)));
  }
  const uint32_t host_cpu = t.host - uploads;
  if (host_cpu > 0) {
    const uint64_t bytes = uint64_t{host_cpu} * block_bytes;
    merge_after.push_back(add(plan, TaskKind::kCpuAttend, Lane::kCpu, bytes, host_cpu,
                              rt.cpu_call_us + us_for(bytes, rt.cpu_attend_gbps), {planned}));
  }
  // Blocks read from NVMe in time, and the far-field term of late ones (one
  // summary row each), once the reads have landed.
  if (in_time > 0 || plan.late_blocks > 0) {
    const uint64_t bytes = uint64_t{in_time} * block_bytes +
                           uint64_t{plan.late_blocks} * summary_row_bytes(in.shape, SummaryKind::kMeanF32) * 2;
    std::vector<uint32_t> after{planned};
    if (in_time > 0) after.insert(after.end(), read_tasks.begin(), read_tasks.end());
    // The executor's calls: reads in flight from earlier steps join the host
    // blocks' call (one more only if there is none), this step's reads are
    // attended in rounds of kReadRoundBlocks, one call each, and the far
    // field in one more. (A batch is counted as one sequence, though the
    // executor calls per sequence.)
    const uint32_t earlier = std::min<uint32_t>(in_time, static_cast<uint32_t>(c.reading.size()));
    const uint32_t calls = (host_cpu == 0 && earlier > 0 ? 1 : 0) +
                           (in_time - earlier + kReadRoundBlocks - 1) / kReadRoundBlocks +
                           (plan.late_blocks > 0 ? 1 : 0);
    merge_after.push_back(add(plan, TaskKind::kCpuAttend, Lane::kCpu, bytes, in_time,
                              calls * rt.cpu_call_us + us_for(bytes, rt.cpu_attend_gbps), std::move(after)));
  }
  plan.cpu_attend_bytes = uint64_t{host_cpu + in_time} * block_bytes;
  // Merge: every partial state of every q head, read once on the GPU.
  const uint64_t rows = in.batch.size() * uint64_t{in.shape.q_heads};
  const uint64_t merge_bytes = merge_after.size() * rows * (in.shape.head_dim + 1) * 4;
  const uint32_t merge = add(plan, TaskKind::kMerge, Lane::kGpu, merge_bytes, 0,
                             rt.launch_us + us_for(merge_bytes, rt.gpu_attend_gbps), std::move(merge_after));
  add(plan, TaskKind::kFinish, Lane::kCpu, 0, 0, rt.host_step_us, {merge});

  // Completed tail blocks go home off the critical path.
  if (c.completed > 0) {
    const uint64_t bytes = uint64_t{c.completed} * block_bytes;
    const uint32_t down = add(plan, TaskKind::kWriteBack, Lane::kCopyD2h, bytes, c.completed,
                              rt.launch_us + us_for(bytes, rt.d2h_gbps), {});
    if (c.completed_to_nvme > 0) {
      const uint64_t nvme_bytes = uint64_t{c.completed_to_nvme} * block_bytes;
      add(plan, TaskKind::kWriteBack, Lane::kNvme, nvme_bytes, c.completed_to_nvme,
          rt.nvme_latency_us + us_for(nvme_bytes, rt.nvme_write_gbps), {down});
    }
  }
  std::vector<double> finish;
  plan.estimated_us = lane_schedule(plan.tasks, finish);
  return plan;
}

}  // namespace kvtier::scheduler
