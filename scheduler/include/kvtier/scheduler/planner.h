// The planner (DESIGN.md section 3, "plan, then run"): for one layer of one
// decode step of a batch of sequences, from the policy, where each selected
// block is, and the device rates, a small task graph saying which device does
// what and in which order. It is a pure function of its inputs -- no clocks,
// no I/O, no allocation outside its result -- so that the executor runs its
// plans on real devices and the simulator runs the same plans on modeled ones.
//
// The graph of one layer step:
//
//   prepare (host) -+-> score (cpu) -> top-k (cpu) -> plan (host) -+-> nvme reads -> (late: summary) ...
//                   |                     +-> uploads (copy engine) -> gpu attend selected -+
//                   |                     +-> cpu attend host blocks (+ far field) ---------+-> merge -> finish (host)
//                   +-> gpu attend sinks + window (needs no selection) --------------------+
//   write back a block completed by this step's append (copy d2h, then its home)
//
// prepare, plan and finish are the executor's own serial host work (the
// host_*_us rates); they run on the cpu lane.
//
// The choice the cost model makes: each selected block that lives in host
// memory is either attended by the CPU where it lies or uploaded and attended
// by the GPU, whichever balances the two paths so that the later one ends
// first; uploads are limited by the GPU slots free for them. Blocks only on
// NVMe are read into host staging first; under LatePolicy::kSummary a block
// whose read cannot land before the rest of the step is done is "late": this
// step uses its summary (far-field term) and the read goes on, so that a later
// step attends it exactly.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"
#include "kvtier/core/status.h"

namespace kvtier::scheduler {

// Where a selected block is when the step is planned (from the BlockTable).
enum class Residency : uint8_t {
  kGpu,          // a GPU slot holds it
  kHost,         // pinned host memory holds it (its home, or the NVMe staging cache)
  kNvme,         // only its NVMe home holds it
  kNvmeReading,  // only NVMe, and a read into host staging issued earlier is in flight
};

struct SelectedBlock {
  uint32_t chunk = 0;
  Residency where = Residency::kHost;
};

// One sequence of the batch at this layer's step.
struct SequenceStep {
  uint64_t context_tokens = 0;  // tokens attended this step (after appending the new one)
  // [kv_heads]: the far blocks top-k selected for each KV head. Sinks and the
  // window are not listed: the store keeps them on the GPU.
  std::vector<std::vector<SelectedBlock>> selected;
  // This step's append filled the tail block, which must now be written home.
  bool tail_block_completed = false;
  bool tail_home_on_nvme = false;
};

// Device rates the cost model uses: measured (kvtier calibrate) or modeled
// (the simulator's machine profile). GB/s are 1e9 bytes per second.
struct CostRates {
  double gpu_attend_gbps = 0;  // decode kernel, KV bytes read per second
  double cpu_attend_gbps = 0;  // host block attention, all CPU workers together
  double cpu_score_gbps = 0;   // summary scoring, summary bytes read per second
  double cpu_topk_gbps = 0;    // top-k over the block scores, fp32 score bytes ranked per second
  double h2d_gbps = 0;         // batched block uploads
  double d2h_gbps = 0;         // block downloads (write-back of completed blocks)
  double nvme_read_gbps = 0;   // block reads at the executor's queue depth
  double nvme_write_gbps = 0;
  double nvme_latency_us = 0;  // one block read at that depth
  double launch_us = 0;        // fixed cost of one kernel or copy batch
  // The executor's own host time, serial with the devices (kvtier calibrate
  // measures it by running the executor; 0 leaves it out of the model):
  double host_list_us = 0;   // prepare, per (sequence, KV head): append, hot-set pins, launches
  double host_block_us = 0;  // the plan node, per selected block: residency, planning, pins, I/O issue
  double host_step_us = 0;   // per layer step: task hand-offs, top-k and scoring beyond the scoring
                             // rate, write-back bookkeeping
  double cpu_call_us = 0;    // per CPU attention call of a step (host blocks; each round of NVMe
                             // reads; the far field): what a call costs beyond its bytes at
                             // cpu_attend_gbps
};

// NVMe reads the executor waits for per round, and attends per CPU call: the
// staging cache holds at least 64 blocks, and two rounds are in flight at once.
inline constexpr uint32_t kReadRoundBlocks = 16;

// The share of the executor's plan node spent finding where each selected
// block is (its residency census), after which, under LatePolicy::kWait, it
// issues the reads of blocks found only on NVMe (ExecutorOptions::early_reads).
// Since the census also marks the copies it finds as used (TieredStore::census)
// it takes 0.29-0.33 of the node in the late=wait phases that make NVMe
// reads (the median 0.31 is used; 0.29-0.36 with the late=summary phases)
// and 0.38-0.44 where none are made: plan_residency_us / plan_us of v11's
// runs at 128K on 8 GiB and 1M and of 2026-11-29-e2e-h200-1m-census on the
// H200 host. Before the marking it was 0.095-0.115 (v9).
inline constexpr double kPlanCensusShare = 0.31;

// Bytes the scorer reads per far block and KV head: one summary row of
// `kind`, padded as cpu::SummaryTable stores it.
uint64_t summary_row_bytes(const ModelShape& shape, SummaryKind kind);

// Checks that every rate is finite and > 0 (latencies >= 0), naming the field.
Status validate(const CostRates& rates);

enum class LatePolicy : uint8_t {
  kWait,     // the step waits for NVMe reads of selected blocks
  kSummary,  // a block whose read cannot land in time contributes its summary this step
};
std::string_view late_policy_name(LatePolicy policy);
Result<LatePolicy> parse_late_policy(std::string_view text);

struct PlanInputs {
  ModelShape shape;
  SparsityPolicy policy;
  uint32_t layer = 0;
  std::span<const SequenceStep> batch;
  CostRates rates;
  LatePolicy late = LatePolicy::kWait;
  // Under kWait, NVMe reads go out after the plan node's residency census
  // (ExecutorOptions::early_reads); off, after the whole node.
  bool early_reads = true;
  // GPU slots this layer's uploads may fill without evicting a pinned,
  // protected or already selected block.
  uint32_t upload_slots_free = 0;
  // The GPU scores the summaries (ExecutorOptions::score_on_gpu): the score
  // task runs on the GPU lane at gpu_attend_gbps, ahead of the hot set, and
  // top-k waits for the scores' download too.
  bool score_on_gpu = false;
};

enum class Lane : uint8_t { kCpu, kGpu, kCopyH2d, kCopyD2h, kNvme };
std::string_view lane_name(Lane lane);

enum class TaskKind : uint8_t {
  kScore,        // summary scoring of every far block (cpu, or gpu under score_on_gpu)
  kTopk,         // top-k per KV head (cpu)
  kGpuAttendHot, // sinks + window on the GPU: needs no selection
  kNvmeRead,     // selected blocks only on NVMe -> host staging
  kUpload,       // host blocks -> GPU slots (one batched copy)
  kGpuAttendSelected,  // selected blocks in GPU slots (resident and uploaded)
  kCpuAttend,    // selected blocks in host memory, plus the far field of late ones
  kMerge,        // the partial states, by log-sum-exp (on the GPU)
  kWriteBack,    // completed tail blocks: GPU -> host, and on to NVMe where that is their home
  kPrepare,      // executor host work before scoring: appends, hot-set pins, launches (host_list_us)
  kPlan,         // executor host work between top-k and the devices (host_block_us)
  kFinish,       // executor host work per layer step beyond the tasks' own (host_step_us)
};
std::string_view task_kind_name(TaskKind kind);

struct Task {
  TaskKind kind = TaskKind::kScore;
  Lane lane = Lane::kCpu;
  uint64_t bytes = 0;      // bytes the task reads or moves
  uint32_t blocks = 0;     // blocks it touches (0 where that means nothing)
  double cost_us = 0;      // the cost model's estimate
  std::vector<uint32_t> after;  // indices of tasks that must finish first (all smaller)
  // Runs for later steps (the reads of late blocks): it holds its lane like
  // any task, but this step neither waits for it nor ends with it.
  bool background = false;
};

// Where the selected blocks of one (sequence, KV head) are attended, by chunk.
struct HeadPlan {
  std::vector<uint32_t> gpu;     // already in GPU slots
  std::vector<uint32_t> upload;  // uploaded this step, then attended on the GPU
  std::vector<uint32_t> cpu;     // attended by the CPU from host memory (read from NVMe first if in `read`)
  std::vector<uint32_t> read;    // read from NVMe this step (new reads; in-flight ones are not repeated)
  std::vector<uint32_t> late;    // not in time: summary used this step, read still landing
};

struct LayerPlan {
  std::vector<Task> tasks;        // topologically ordered: every `after` index is smaller
  std::vector<HeadPlan> heads;    // [sequence * kv_heads + kv_head]
  double estimated_us = 0;        // makespan of lane_schedule(tasks): the layer step's modeled time
  uint32_t late_blocks = 0;
  uint64_t hot_bytes = 0;         // sinks + window bytes the GPU attends
  uint64_t uploaded_bytes = 0;
  uint64_t nvme_read_bytes = 0;
  uint64_t cpu_attend_bytes = 0;
};

// Plans one layer's step for the whole batch. Errors name the bad input
// (shape, policy, rates, a selected chunk outside the context or among the
// sinks and window, a head count that does not match the shape).
Result<LayerPlan> plan_layer(const PlanInputs& in);

// Earliest finish time of every task when each lane runs its tasks one at a
// time in order and a task starts once its `after` tasks are done: the
// schedule the simulator's virtual clock would give with one queue per lane.
// finish_us[i] for task i; returns the makespan of the tasks that are not
// background (those still hold their lanes).
double lane_schedule(std::span<const Task> tasks, std::vector<double>& finish_us);

}  // namespace kvtier::scheduler
