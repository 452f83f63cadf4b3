#include "kvtier/scheduler/calibration.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "kvtier/core/sizes.h"
#include "machine_presets.h"

namespace kvtier::scheduler {
namespace {

using nlohmann::json;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

// ---- the rules ------------------------------------------------------------

// One scalar field measured by one result.
struct ScalarRule {
  const char* field;
  const char* suite;
  const char* result;
  const char* unit;
};

constexpr ScalarRule kReadRule{"host.read_gbps", "memory", "read_gbps_all_threads", "GB/s"};
constexpr ScalarRule kScoreRule{"host.score_gbps", "cpu", "summary_scoring_1m", "GB/s"};
constexpr ScalarRule kAttendRule{"host.attend_gbps", "cpu", "block_attention_host", "GB/s"};
constexpr ScalarRule kTopkRule{"host.topk_gbps", "cpu", "topk_1m_scores", "GB/s"};
constexpr ScalarRule kHbmRule{"gpu.hbm_read_gbps", "gpu", "hbm_copy_bw", "GB/s"};
constexpr ScalarRule kTflopsRule{"gpu.bf16_tflops", "gpu", "cublas_bf16_gemm", "TFLOP/s"};
constexpr ScalarRule kDuplexRule{"link.duplex_factor", "storage", "h2d_d2h_duplex_32mib", "GB/s"};
constexpr ScalarRule kLatencyRule{"nvme.latency_us", "storage", "uring_rand_block_read_qd1", "GB/s"};
// The executor's host time (executor suite, per layer step): prepare per
// list, plan per selected block, and the rest of the step beyond what the
// model already prices (scoring at score_gbps, the device waits).
constexpr ScalarRule kPrepareRule{"host.prepare_us_per_list", "executor", "executor_prepare_us", "us"};
constexpr ScalarRule kPlanRule{"host.plan_us_per_block", "executor", "executor_plan_us", "us"};
constexpr ScalarRule kStepRule{"host.step_overhead_us", "executor", "executor_layer_step_us", "us"};
constexpr ScalarRule kCallRule{"host.attend_call_us", "executor", "executor_host_cpu_call_us", "us"};
// Its prefill's host passes per query block and layer, as rates.
constexpr ScalarRule kPrefillStageRule{"host.prefill_stage_gbps", "executor", "executor_prefill_stage_ms", "ms"};
constexpr ScalarRule kPrefillQueryRule{"host.prefill_query_gbps", "executor", "executor_prefill_query_ms", "ms"};
// The CPU stand-in for a GPU (--gpu cpu-standin): its attention rates as the
// executor and the cpu suite measure them, and the parallel memcpy its copies are.
constexpr ScalarRule kStandinAttendRule{"gpu.hbm_read_gbps (cpu-standin)", "cpu", "block_attention_host", "GB/s"};
constexpr ScalarRule kStandinPrefillRule{"gpu.bf16_tflops (cpu-standin)", "executor", "executor_prefill_attention_tflops", "TFLOP/s"};
constexpr ScalarRule kStandinCopyRule{"link.h2d, link.d2h (cpu-standin)", "memory", "copy_gbps_all_threads", "GB/s"};

// The link curve: one pinned copy of `bytes` each way (storage suite, h2d_bench.cpp).
struct LinkPointRule {
  uint64_t bytes;
  const char* h2d;
  const char* d2h;
};

constexpr LinkPointRule kLinkRules[] = {
    {4 * kKiB, "h2d_copy_4kib", "d2h_copy_4kib"},
    {32 * kKiB, "h2d_copy_32kib", "d2h_copy_32kib"},
    {256 * kKiB, "h2d_copy_256kib", "d2h_copy_256kib"},
    {2 * kMiB, "h2d_copy_2mib", "d2h_copy_2mib"},
    {32 * kMiB, "h2d_single_copy_32mib", "d2h_copy_32mib"},
};

// The NVMe grid: 32 KiB random block requests (the KV tier's own pattern)
// and 1 MiB sequential requests, each at QD 1, 8, 32, 64 (storage suite).
struct GridPointRule {
  uint64_t request_bytes;
  uint32_t queue_depth;
  const char* read;
  const char* write;
};

constexpr GridPointRule kGridRules[] = {
    {32 * kKiB, 1, "uring_rand_block_read_qd1", "uring_block_write_qd1"},
    {32 * kKiB, 8, "uring_rand_block_read_qd8", "uring_block_write_qd8"},
    {32 * kKiB, 32, "uring_rand_block_read_qd32", "uring_block_write_qd32"},
    {32 * kKiB, 64, "uring_rand_block_read_qd64", "uring_block_write_qd64"},
    {kMiB, 1, "uring_seq_read_1m_qd1", "uring_seq_write_1m_qd1"},
    {kMiB, 8, "uring_seq_read_1m_qd8", "uring_seq_write_1m_qd8"},
    {kMiB, 32, "uring_seq_read_1m_qd32", "uring_seq_write_1m_qd32"},
    {kMiB, 64, "ceiling_seq_read_1m_qd64", "uring_seq_write_1m_qd64"},
};

std::string link_field(const char* direction, uint64_t bytes) {
  return "link." + std::string(direction) + "[" + format_bytes(bytes) + "].gbps";
}

std::string grid_field(const char* table, const GridPointRule& p) {
  return "nvme." + std::string(table) + "[" + format_bytes(p.request_bytes) + ", QD" + std::to_string(p.queue_depth) +
         "].gbps";
}

CalibrationRule rule_of(const ScalarRule& r) { return {r.field, r.suite, r.result, r.unit}; }

// ---- reading the reports ----------------------------------------------------

// One suite's report: its results by name, each checked for its unit and a
// positive finite value; every error names the suite and the result.
class SuiteReport {
 public:
  static Result<SuiteReport> open(std::string_view suite, const json& report) {
    const std::string where = "the " + std::string(suite) + " report";
    if (!report.is_object())
      return invalid_argument(where + " is not a JSON object (kvtier-bench " + std::string(suite) + " --json prints one)");
    const auto bench = report.find("bench");
    if (bench == report.end() || !bench->is_string() || *bench != suite)
      return invalid_argument(where + " has \"bench\": " + (bench == report.end() ? "nothing" : bench->dump()) +
                              ", not \"" + std::string(suite) + "\"");
    const auto results = report.find("results");
    if (results == report.end() || !results->is_array())
      return invalid_argument(where + " has no \"results\" array");
    return SuiteReport(suite, report);
  }

  // The value of result `name` for profile field `field`: > 0, or >= 0 with allow_zero.
  Result<double> value(std::string_view name, std::string_view unit, std::string_view field,
                       bool allow_zero = false) const {
    const std::string what = "the " + suite_ + " report's result '" + std::string(name) + "' (for " +
                             std::string(field) + ")";
    for (const json& row : (*report_)["results"]) {
      if (!row.is_object() || row.value("name", "") != name) continue;
      const auto v = row.find("value");
      if (v == row.end() || !v->is_number()) return invalid_argument(what + " has no numeric value");
      if (row.value("unit", "") != unit)
        return invalid_argument(what + " is in '" + row.value("unit", "") + "', expected '" + std::string(unit) + "'");
      const double x = v->get<double>();
      if (!std::isfinite(x) || !(allow_zero ? x >= 0 : x > 0))
        return invalid_argument(what + " = " + v->dump() + (allow_zero ? ": must be >= 0" : ": must be > 0"));
      return x;
    }
    return not_found("the " + suite_ + " report has no result '" + std::string(name) + "' (needed for " +
                     std::string(field) + ")" + missing_hint());
  }

  Result<double> value(const ScalarRule& r) const { return value(r.result, r.unit, r.field); }

  // A config entry, or null.
  json config(const char* key) const {
    const auto config = report_->find("config");
    if (config == report_->end() || !config->is_object() || !config->contains(key)) return json();
    return (*config)[key];
  }

  // A config entry as text, or `fallback`.
  std::string config_text(const char* key, std::string fallback) const {
    const json v = config(key);
    return v.is_null() ? fallback : v.is_string() ? v.get<std::string>() : v.dump();
  }

 private:
  SuiteReport(std::string_view suite, const json& report) : suite_(suite), report_(&report) {}

  // The storage suite says in config.h2d why it has no link figures.
  std::string missing_hint() const {
    std::string hint = "; kvtier-bench " + suite_ + " --json of this build should print it";
    if (suite_ == "storage") hint += " (its h2d note: " + config_text("h2d", "none") + ")";
    return hint;
  }

  std::string suite_;
  const json* report_;
};

// "field = suite:result" for each rule, joined.
std::string rule_list(std::initializer_list<CalibrationRule> rules) {
  std::string out;
  for (const CalibrationRule& r : rules) out += (out.empty() ? "" : ", ") + r.field + " = " + r.suite + ":" + r.result;
  return out;
}

// ---- the parts ------------------------------------------------------------

Result<uint32_t> host_cores(const MachineFacts& facts, const SuiteReport& cpu) {
  if (facts.topology && facts.topology->cores > 0) return facts.topology->cores;
  // Without hwloc the cpu suite's engine still ran one thread per core it found.
  const json threads = cpu.config("threads");
  if (threads.is_number_integer() && threads.get<int64_t>() > 0 && threads.get<int64_t>() <= INT32_MAX)
    return static_cast<uint32_t>(threads.get<int64_t>());
  return invalid_argument("host.cores: the machine's topology is unknown (" + facts.topology_error +
                          ") and the cpu report's config has no \"threads\"");
}

// host.*_us from the executor report: per list, per block, and the step's
// remainder after prepare, plan, scoring at h.score_gbps and the device waits.
Status executor_part(const SuiteReport& ex, HostProfile& h) {
  KVT_ASSIGN_OR_RETURN(const double step, ex.value(kStepRule));
  KVT_ASSIGN_OR_RETURN(const double prepare, ex.value(kPrepareRule));
  KVT_ASSIGN_OR_RETURN(const double plan, ex.value(kPlanRule));
  KVT_ASSIGN_OR_RETURN(const double waits, ex.value("executor_device_wait_us", "us", "host.step_overhead_us"));
  KVT_ASSIGN_OR_RETURN(const double lists, ex.value("executor_lists_per_layer_step", "lists", "host.prepare_us_per_list"));
  KVT_ASSIGN_OR_RETURN(const double blocks,
                       ex.value("executor_selected_blocks_per_layer_step", "blocks", "host.plan_us_per_block"));
  KVT_ASSIGN_OR_RETURN(const double score_bytes,
                       ex.value("executor_score_bytes_per_layer_step", "bytes", "host.step_overhead_us",
                                /*allow_zero=*/true));  // 0 where the GPU scored
  KVT_ASSIGN_OR_RETURN(const double topk_bytes,
                       ex.value("executor_topk_bytes_per_layer_step", "bytes", "host.step_overhead_us"));
  h.prepare_us_per_list = prepare / lists;
  h.plan_us_per_block = plan / blocks;
  const double score_at_rate_us = score_bytes / (h.score_gbps * 1e3);
  const double topk_at_rate_us = topk_bytes / (h.topk_gbps * 1e3);
  h.step_overhead_us = std::max(0.0, step - prepare - plan - score_at_rate_us - topk_at_rate_us - waits);
  // The host-resident run's CPU attention calls, less their bytes at the cpu
  // suite's bulk rate.
  KVT_ASSIGN_OR_RETURN(const double call_us, ex.value(kCallRule));
  KVT_ASSIGN_OR_RETURN(const double call_bytes,
                       ex.value("executor_host_cpu_bytes_per_call", "bytes", "host.attend_call_us"));
  h.attend_call_us = std::max(0.0, call_us - call_bytes / (h.attend_gbps * 1e3));
  KVT_ASSIGN_OR_RETURN(const double stage_ms, ex.value(kPrefillStageRule));
  KVT_ASSIGN_OR_RETURN(const double query_ms, ex.value(kPrefillQueryRule));
  KVT_ASSIGN_OR_RETURN(const double kv_bytes,
                       ex.value("executor_prefill_kv_bytes_per_layer_block", "bytes", "host.prefill_stage_gbps"));
  KVT_ASSIGN_OR_RETURN(const double q_bytes,
                       ex.value("executor_prefill_q_bytes_per_layer_block", "bytes", "host.prefill_query_gbps"));
  // bytes / ms / 1e6 is GB/s.
  h.prefill_stage_gbps = kv_bytes / stage_ms / 1e6;
  h.prefill_query_gbps = q_bytes / query_ms / 1e6;
  return Status::ok_status();
}

Result<HostProfile> host_part(const MachineFacts& facts, const SuiteReport& memory, const SuiteReport& cpu,
                              const SuiteReport& executor, const CalibrationInputs& in) {
  HostProfile h;
  if (facts.memory_bytes == 0) return invalid_argument("host.memory_bytes: the machine facts report no RAM");
  h.memory_bytes = facts.memory_bytes;
  KVT_ASSIGN_OR_RETURN(h.cores, host_cores(facts, cpu));
  KVT_ASSIGN_OR_RETURN(h.read_gbps, memory.value(kReadRule));
  KVT_ASSIGN_OR_RETURN(h.score_gbps, cpu.value(kScoreRule));
  KVT_ASSIGN_OR_RETURN(h.attend_gbps, cpu.value(kAttendRule));
  KVT_ASSIGN_OR_RETURN(h.topk_gbps, cpu.value(kTopkRule));
  KVT_RETURN_IF_ERROR(executor_part(executor, h));
  const std::string model = facts.cpu.model_name.empty() ? "host" : facts.cpu.model_name;
  h.name = model + ", " + format_bytes(h.memory_bytes);
  h.source = "measured by " + in.origin + ": " +
             rule_list({rule_of(kReadRule), rule_of(kScoreRule), rule_of(kAttendRule), rule_of(kTopkRule)}) +
             " (each with all of the suite's threads); host.memory_bytes = physical RAM (sysconf), host.cores = "
             "physical cores (hwloc); the decode executor's host time per layer step from the executor suite ("
             "executor.config.context_tokens = " + executor.config_text("context_tokens", "?") +
             ", backend " + executor.config_text("backend", "?") +
             ", every selected block GPU-resident): host.prepare_us_per_list = executor_prepare_us / "
             "executor_lists_per_layer_step, host.plan_us_per_block = executor_plan_us / "
             "executor_selected_blocks_per_layer_step, host.step_overhead_us = executor_layer_step_us - "
             "executor_prepare_us - executor_plan_us - executor_device_wait_us - executor_score_bytes_per_layer_step "
             "/ host.score_gbps - executor_topk_bytes_per_layer_step / host.topk_gbps (clamped at 0): what the simulator's other terms do not already price (where the "
             "GPU scored the summaries, executor_prepare_us leaves out the wait for its scores, which counts as a "
             "device wait, and no summary bytes were CPU-scored); "
             "host.attend_call_us = executor_host_cpu_call_us - executor_host_cpu_bytes_per_call / host.attend_gbps "
             "(clamped at 0), from a second run whose GPU budget is twice the hot set, so the selected blocks its "
             "cache misses are host-resident; from the first "
             "run's prefill: host.prefill_stage_gbps = executor_prefill_kv_bytes_per_layer_block / "
             "executor_prefill_stage_ms, host.prefill_query_gbps = executor_prefill_q_bytes_per_layer_block / "
             "executor_prefill_query_ms";
  return h;
}

Result<GpuProfile> gpu_part(const MachineFacts& facts, const SuiteReport& gpu, const CalibrationInputs& in) {
  const gpu::GpuDevice& device = facts.gpus.front();
  GpuProfile g;
  g.name = device.name;
  g.memory_bytes = device.memory_bytes;
  g.sm_count = device.sm_count;
  KVT_ASSIGN_OR_RETURN(g.hbm_read_gbps, gpu.value(kHbmRule));
  KVT_ASSIGN_OR_RETURN(g.bf16_tflops, gpu.value(kTflopsRule));
  g.source = "measured by " + in.origin + " on GPU 0: " + rule_list({rule_of(kHbmRule), rule_of(kTflopsRule)}) +
             ". hbm_copy_bw is a device-to-device copy counting bytes read plus bytes written, i.e. the DRAM "
             "traffic per second a streaming kernel sustains; it is taken unchanged as the read rate of a "
             "read-mostly kernel such as sparse decode (not halved: DRAM bandwidth is shared by both directions, "
             "and a read-only stream reaches about the same total). memory_bytes and sm_count from the CUDA "
             "runtime";
  return g;
}

Result<LinkProfile> link_part(const MachineFacts& facts, const SuiteReport& storage, const CalibrationInputs& in) {
  const gpu::GpuDevice& device = facts.gpus.front();
  LinkProfile l;
  std::string rules;
  for (const LinkPointRule& p : kLinkRules) {
    KVT_ASSIGN_OR_RETURN(const double up, storage.value(p.h2d, "GB/s", link_field("h2d", p.bytes)));
    KVT_ASSIGN_OR_RETURN(const double down, storage.value(p.d2h, "GB/s", link_field("d2h", p.bytes)));
    l.h2d.points.push_back({p.bytes, up});
    l.d2h.points.push_back({p.bytes, down});
    rules += (rules.empty() ? "" : ", ") + format_bytes(p.bytes) + " = storage:" + p.h2d + " / " + p.d2h;
  }
  KVT_ASSIGN_OR_RETURN(const double duplex, storage.value(kDuplexRule));
  const double one_way_sum = l.h2d.points.back().gbps + l.d2h.points.back().gbps;
  l.duplex_factor = std::min(1.0, duplex / one_way_sum);
  const bool pcie_known = device.pcie_gen_max > 0 && device.pcie_width_max > 0;
  l.name = (pcie_known ? "PCIe gen" + std::to_string(device.pcie_gen_max) + " x" +
                             std::to_string(device.pcie_width_max)
                       : std::string("host link")) +
           " to " + device.name;
  l.source = "measured by " + in.origin + ": one synchronous pinned copy each way (h2d / d2h) of " + rules +
             "; link.duplex_factor = storage:h2d_d2h_duplex_32mib (bytes per second of both directions at once) / "
             "(h2d_single_copy_32mib + d2h_copy_32mib), capped at 1";
  return l;
}

Result<NvmeProfile> nvme_part(const SuiteReport& storage, const CalibrationInputs& in) {
  NvmeProfile n;
  if (in.nvme_capacity_bytes == 0)
    return invalid_argument("nvme.capacity_bytes: the benchmark directory has no free space");
  n.capacity_bytes = in.nvme_capacity_bytes;
  std::string rules;
  for (const GridPointRule& p : kGridRules) {
    KVT_ASSIGN_OR_RETURN(const double r, storage.value(p.read, "GB/s", grid_field("read", p)));
    KVT_ASSIGN_OR_RETURN(const double w, storage.value(p.write, "GB/s", grid_field("write", p)));
    n.read.points.push_back({p.request_bytes, p.queue_depth, r});
    n.write.points.push_back({p.request_bytes, p.queue_depth, w});
    rules += (rules.empty() ? "" : ", ") + format_bytes(p.request_bytes) + " QD" + std::to_string(p.queue_depth) +
             " = " + p.read + " / " + p.write;
  }
  KVT_ASSIGN_OR_RETURN(const double qd1_gbps, storage.value(kLatencyRule));
  // bytes / (GB/s) is nanoseconds.
  n.latency_us = static_cast<double>(32 * kKiB) / qd1_gbps / 1e3;
  const json fs = storage.config("fs_type");
  const std::string fs_name = fs.is_object() && fs.contains("name") && fs["name"].is_string()
                                  ? fs["name"].get<std::string>()
                                  : "";
  n.name = (fs_name.empty() ? std::string("drive") : fs_name) + " at " + storage.config_text("dir", "?");
  n.source = "measured by " + in.origin + " with O_DIRECT io_uring on " + n.name +
             " (32 KiB requests at random block offsets, 1 MiB requests sequential), read / write storage results: " +
             rules + "; nvme.latency_us = 32 KiB / storage:uring_rand_block_read_qd1 (one 32 KiB read at QD1, issue "
             "to completion: a little more than the 4 KiB the schema names); nvme.capacity_bytes = free space of the "
             "directory (statvfs) before the benchmark ran";
  return n;
}

// The gpu and link parts of a GPU preset.
Result<std::pair<GpuProfile, LinkProfile>> preset_parts(const std::string& name, const CalibrationInputs& in) {
  const auto gpus = detail::gpu_presets();
  const auto g = std::find_if(gpus.begin(), gpus.end(), [&](const detail::GpuPreset& p) { return p.gpu.name == name; });
  if (g == gpus.end()) {
    std::string names;
    for (const std::string& n : preset_names(MachinePart::kGpu)) names += (names.empty() ? "" : ", ") + n;
    return invalid_argument("unknown GPU preset '" + name + "' (GPU presets: " + names + ")");
  }
  const auto links = detail::link_presets();
  const auto l = std::find_if(links.begin(), links.end(), [&](const LinkProfile& p) { return p.name == g->link; });
  KVT_ASSERT(l != links.end(), "GPU preset ", name, " names an unknown link preset ", g->link);
  const std::string note = "not measured: preset given to " + in.origin + " with --gpu " + name + ". ";
  std::pair<GpuProfile, LinkProfile> parts{g->gpu, *l};
  parts.first.source = note + parts.first.source;
  parts.second.source = note + parts.second.source;
  return parts;
}

// The gpu and link parts of the CPU stand-in, measured on this host.
Result<std::pair<GpuProfile, LinkProfile>> standin_parts(const MachineFacts& facts, const HostProfile& host,
                                                         const SuiteReport& memory, const SuiteReport& cpu,
                                                         const SuiteReport& executor, const CalibrationInputs& in) {
  // The executor suite must have run on the stand-in, else its prefill rate is a GPU's.
  const std::string backend = executor.config_text("backend", "");
  if (backend.rfind("backend cpu", 0) != 0)
    return invalid_argument("gpu.bf16_tflops (cpu-standin): the executor report's config.backend is '" +
                            backend.substr(0, 60) +
                            "', not the CPU stand-in ('backend cpu ...'); calibrate the stand-in on a machine "
                            "without a GPU, or with it hidden (CUDA_VISIBLE_DEVICES=)");
  GpuProfile g;
  g.name = "CPU stand-in (" + host.name + ")";
  g.memory_bytes = facts.memory_bytes;
  g.sm_count = host.cores;
  g.cpu_standin = true;
  KVT_ASSIGN_OR_RETURN(g.hbm_read_gbps, cpu.value(kStandinAttendRule));
  KVT_ASSIGN_OR_RETURN(g.bf16_tflops, executor.value(kStandinPrefillRule));
  g.source = "measured by " + in.origin + " with --gpu " + std::string(kCpuStandinName) +
             ": no GPU; kvtier's CPU backend stands in for one, so its decode attention rate is the host's "
             "block attention (" + rule_list({rule_of(kStandinAttendRule)}) + ") and its prefill attention rate "
             "what the executor suite's prefill attention reached on the stand-in (" +
             rule_list({rule_of(kStandinPrefillRule)}) + ", 4 x head_dim FLOPs per query-key pair and q head); "
             "memory_bytes = host RAM (its slots are host memory), sm_count = host cores";
  LinkProfile l;
  KVT_ASSIGN_OR_RETURN(const double copy, memory.value(kStandinCopyRule));
  // The suite counts a copy's bytes read and written; a copy moves half that.
  const double moved = copy / 2;
  l.h2d.points.push_back({32 * kMiB, moved});
  l.d2h.points.push_back({32 * kMiB, moved});
  l.duplex_factor = 0.5;  // both directions at once share the same cores and memory
  l.name = "memcpy on " + host.name;
  l.source = "measured by " + in.origin + ": the CPU stand-in's uploads and downloads are memcpy split over all "
             "threads; both directions = memory:copy_gbps_all_threads / 2 (the suite counts bytes read plus "
             "written); duplex_factor 0.5 assumed (both directions share the cores and memory)";
  return std::pair<GpuProfile, LinkProfile>{std::move(g), std::move(l)};
}

Status no_gpu_error(const MachineFacts& facts) {
  std::string names;
  for (const std::string& n : preset_names(MachinePart::kGpu)) names += (names.empty() ? "" : ", ") + n;
  const std::string why = facts.gpus.empty()
                              ? "this machine has no GPU" + (facts.gpu_error.empty() ? "" : " (" + facts.gpu_error + ")")
                              : "there is no gpu report";
  return invalid_argument(why + ": the gpu and link parts cannot be measured; give a GPU preset (--gpu NAME, one of " +
                          names + ") to take them from it, or --gpu " + std::string(kCpuStandinName) +
                          " to measure kvtier's CPU stand-in for one");
}

}  // namespace

std::vector<CalibrationRule> calibration_rules() {
  std::vector<CalibrationRule> rules;
  for (const ScalarRule& r : {kReadRule, kScoreRule, kAttendRule, kTopkRule, kPrepareRule, kPlanRule, kStepRule, kCallRule,
                              kPrefillStageRule, kPrefillQueryRule, kHbmRule, kTflopsRule, kStandinAttendRule,
                              kStandinPrefillRule, kStandinCopyRule})
    rules.push_back(rule_of(r));
  for (const LinkPointRule& p : kLinkRules) {
    rules.push_back({link_field("h2d", p.bytes), "storage", p.h2d, "GB/s"});
    rules.push_back({link_field("d2h", p.bytes), "storage", p.d2h, "GB/s"});
  }
  rules.push_back(rule_of(kDuplexRule));
  for (const GridPointRule& p : kGridRules) rules.push_back({grid_field("read", p), "storage", p.read, "GB/s"});
  for (const GridPointRule& p : kGridRules) rules.push_back({grid_field("write", p), "storage", p.write, "GB/s"});
  rules.push_back(rule_of(kLatencyRule));
  return rules;
}

Result<MachineProfile> profile_from_reports(const MachineFacts& facts, const BenchReports& reports,
                                            const CalibrationInputs& inputs) {
  MachineProfile m;
  KVT_ASSIGN_OR_RETURN(const SuiteReport memory, SuiteReport::open("memory", reports.memory));
  KVT_ASSIGN_OR_RETURN(const SuiteReport storage, SuiteReport::open("storage", reports.storage));
  KVT_ASSIGN_OR_RETURN(const SuiteReport cpu, SuiteReport::open("cpu", reports.cpu));
  KVT_ASSIGN_OR_RETURN(const SuiteReport executor, SuiteReport::open("executor", reports.executor));
  KVT_ASSIGN_OR_RETURN(m.host, host_part(facts, memory, cpu, executor, inputs));
  KVT_ASSIGN_OR_RETURN(m.nvme, nvme_part(storage, inputs));
  if (inputs.gpu_preset == kCpuStandinName) {
    KVT_ASSIGN_OR_RETURN(auto parts, standin_parts(facts, m.host, memory, cpu, executor, inputs));
    m.gpu = std::move(parts.first);
    m.link = std::move(parts.second);
  } else if (!inputs.gpu_preset.empty()) {
    KVT_ASSIGN_OR_RETURN(auto parts, preset_parts(inputs.gpu_preset, inputs));
    m.gpu = std::move(parts.first);
    m.link = std::move(parts.second);
  } else {
    if (reports.gpu.is_null() || facts.gpus.empty()) return no_gpu_error(facts);
    KVT_ASSIGN_OR_RETURN(const SuiteReport gpu, SuiteReport::open("gpu", reports.gpu));
    KVT_ASSIGN_OR_RETURN(m.gpu, gpu_part(facts, gpu, inputs));
    KVT_ASSIGN_OR_RETURN(m.link, link_part(facts, storage, inputs));
  }
  m.name = m.host.name + " + " + m.gpu.name + " + " + m.nvme.name;
  KVT_RETURN_IF_ERROR(validate(m));
  return m;
}

}  // namespace kvtier::scheduler
