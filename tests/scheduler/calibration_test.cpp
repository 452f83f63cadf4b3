// profile_from_reports on hand-written benchmark reports: which result fills
// which profile field, and the errors for missing results and a missing GPU.
#include <doctest/doctest.h>

#include <string>
#include <utility>
#include <vector>

#include "kvtier/scheduler/calibration.h"

using namespace kvtier;
using namespace kvtier::scheduler;
using nlohmann::json;

namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

struct Row {
  const char* name;
  double value;
  const char* unit = "GB/s";
};

json report(const char* suite, const std::vector<Row>& rows, json config = json::object()) {
  json results = json::array();
  for (const Row& r : rows)
    results.push_back({{"name", r.name}, {"value", r.value}, {"unit", r.unit}, {"baseline", nullptr}, {"ratio", nullptr}});
  return {{"bench", suite}, {"machine", json::object()}, {"config", std::move(config)}, {"results", results}};
}

json memory_report() {
  return report("memory", {{"read_gbps_single_thread", 20.0}, {"read_gbps_all_threads", 61.0},
                           {"copy_gbps_single_thread", 30.0}, {"copy_gbps_all_threads", 44.0}});
}

json cpu_report() {
  return report("cpu", {{"mem_read_bw", 60.0}, {"summary_scoring_1m", 48.5}, {"block_attention_host", 47.0},
                        {"summary_scoring_1m_ms", 1.3, "ms"}, {"topk_1m_scores", 3.2}},
                {{"threads", 16}});
}

// Every storage result calibrate reads; with_link adds the GPU link figures.
std::vector<Row> storage_rows(bool with_link) {
  std::vector<Row> rows = {
      {"psync_rand_block_read_32threads", 1.0}, {"uring_rand_block_read_qd1", 0.5},
      {"uring_rand_block_read_qd8", 2.5},       {"uring_rand_block_read_qd32", 5.5},
      {"uring_rand_block_read_qd64", 6.0},      {"uring_seq_read_1m_qd1", 2.0},
      {"uring_seq_read_1m_qd8", 6.5},           {"uring_seq_read_1m_qd32", 7.0},
      {"ceiling_seq_read_1m_qd64", 7.1},        {"uring_block_write_qd1", 1.4},
      {"uring_block_write_qd8", 4.0},           {"uring_block_write_qd32", 5.8},
      {"uring_block_write_qd64", 5.9},          {"uring_seq_write_1m_qd1", 4.5},
      {"uring_seq_write_1m_qd8", 6.0},          {"uring_seq_write_1m_qd32", 6.5},
      {"uring_seq_write_1m_qd64", 6.6},
  };
  if (!with_link) return rows;
  const std::vector<Row> link = {
      {"h2d_single_copy_32mib", 24.8}, {"h2d_copy_4kib", 0.4},  {"h2d_copy_32kib", 3.1}, {"h2d_copy_256kib", 12.0},
      {"h2d_copy_2mib", 21.0},         {"d2h_copy_32mib", 25.6}, {"d2h_copy_4kib", 0.5},  {"d2h_copy_32kib", 3.0},
      {"d2h_copy_256kib", 11.5},       {"d2h_copy_2mib", 20.1},  {"h2d_d2h_duplex_32mib", 42.72},
  };
  rows.insert(rows.end(), link.begin(), link.end());
  return rows;
}

json storage_report(bool with_link) {
  return report("storage", storage_rows(with_link),
                {{"dir", "/data/kv"}, {"fs_type", {{"f_type", "0xef53"}, {"name", "ext4"}}}});
}

// 900 us per layer step: prepare 96 over 8 lists, plan 256 over 512 blocks,
// device waits 20, 4.85 MB of summaries, 100 us at the cpu report's 48.5 GB/s,
// and 128 KB of scores ranked, 40 us at its top-k rate of 3.2 GB/s.
json executor_report(double layer_step_us = 900, double score_bytes = 4.85e6,
                     const char* backend = "cuda:0 (NVIDIA GeForce RTX 4090)") {
  return report("executor",
                {{"executor_layer_step_us", layer_step_us, "us"},
                 {"executor_prepare_us", 96, "us"},
                 {"executor_score_us", 300, "us"},
                 {"executor_plan_us", 256, "us"},
                 {"executor_device_wait_us", 20, "us"},
                 {"executor_write_back_us", 70, "us"},
                 {"executor_lists_per_layer_step", 8, "lists"},
                 {"executor_selected_blocks_per_layer_step", 512, "blocks"},
                 {"executor_gpu_resident_share", 1, "fraction"},
                 {"executor_score_bytes_per_layer_step", score_bytes, "bytes"},
                 {"executor_topk_bytes_per_layer_step", 128000, "bytes"},
                 {"executor_host_cpu_call_us", 150, "us"},
                 {"executor_host_cpu_bytes_per_call", 4.7e6, "bytes"},
                 {"executor_host_cpu_blocks_per_layer_step", 143.4, "blocks"},
                 {"executor_host_layer_step_us", 1200, "us"},
                 {"executor_prefill_layer_block_ms", 30, "ms"},
                 {"executor_prefill_stage_ms", 8, "ms"},
                 {"executor_prefill_query_ms", 10, "ms"},
                 {"executor_prefill_rest_ms", 12, "ms"},
                 {"executor_prefill_kv_bytes_per_layer_block", 33554432, "bytes"},
                 {"executor_prefill_q_bytes_per_layer_block", 67108864, "bytes"},
                 {"executor_prefill_attention_ms", 9, "ms"},
                 {"executor_prefill_attention_tflops", 0.42, "TFLOP/s"}},
                {{"context_tokens", 32768}, {"backend", backend}});
}

json gpu_report() {
  return report("gpu", {{"hbm_copy_bw", 940.0}, {"decode_sparse_b1", 300.0}, {"cublas_bf16_gemm", 150.5, "TFLOP/s"}});
}

MachineFacts facts(bool with_gpu) {
  MachineFacts f;
  f.cpu.model_name = "AMD Ryzen 9 7950X";
  f.topology = cpu::Topology{};
  f.topology->cores = 16;
  f.topology->pus = 32;
  f.memory_bytes = 128 * kGiB;
  if (with_gpu) {
    gpu::GpuDevice g;
    g.name = "NVIDIA GeForce RTX 4090";
    g.memory_bytes = 24564 * kMiB;
    g.sm_count = 128;
    g.pcie_gen_max = 4;
    g.pcie_width_max = 16;
    f.gpus.push_back(g);
  } else {
    f.gpu_error = "no CUDA device";
  }
  return f;
}

BenchReports reports(bool with_gpu) {
  return {memory_report(), storage_report(with_gpu), cpu_report(), with_gpu ? gpu_report() : json(),
          executor_report()};
}

CalibrationInputs inputs(std::string gpu_preset = "") {
  return {"kvtier calibrate 2026-11-28", 2000 * kGiB, std::move(gpu_preset)};
}

MachineProfile calibrated(const MachineFacts& f, const BenchReports& r, const CalibrationInputs& in) {
  Result<MachineProfile> m = profile_from_reports(f, r, in);
  INFO(m.status().to_string());
  REQUIRE(m.ok());
  return std::move(m).value();
}

std::string error_of(const MachineFacts& f, const BenchReports& r, const CalibrationInputs& in) {
  Result<MachineProfile> m = profile_from_reports(f, r, in);
  return m.ok() ? "" : m.status().message();
}

bool contains(const std::string& s, std::string_view needle) { return s.find(needle) != std::string::npos; }

}  // namespace

TEST_CASE("a GPU machine: every field comes from its rule") {
  const MachineProfile m = calibrated(facts(true), reports(true), inputs());
  CHECK(validate(m).ok());

  CHECK(m.host.memory_bytes == 128 * kGiB);
  CHECK(m.host.cores == 16);  // physical cores, not the 32 hardware threads
  CHECK(m.host.read_gbps == 61.0);
  CHECK(m.host.score_gbps == 48.5);
  CHECK(m.host.attend_gbps == 47.0);
  CHECK(m.host.prepare_us_per_list == doctest::Approx(12.0));
  CHECK(m.host.plan_us_per_block == doctest::Approx(0.5));
  CHECK(m.host.topk_gbps == 3.2);
  CHECK(m.host.step_overhead_us == doctest::Approx(900.0 - 96 - 256 - 100 - 40 - 20));
  CHECK(m.host.attend_call_us == doctest::Approx(50.0));  // 150 us less 4.7 MB at 47 GB/s
  CHECK(m.host.prefill_stage_gbps == doctest::Approx(33554432 / 8e6));  // bytes per ms / 1e6 = GB/s
  CHECK(m.host.prefill_query_gbps == doctest::Approx(67108864 / 10e6));
  CHECK(contains(m.host.name, "AMD Ryzen 9 7950X"));

  CHECK(m.gpu.name == "NVIDIA GeForce RTX 4090");
  CHECK(m.gpu.memory_bytes == 24564 * kMiB);
  CHECK(m.gpu.sm_count == 128);
  CHECK(m.gpu.hbm_read_gbps == 940.0);  // the copy figure, read + write bytes, unchanged
  CHECK(m.gpu.bf16_tflops == 150.5);

  REQUIRE(m.link.h2d.points.size() == 5);
  REQUIRE(m.link.d2h.points.size() == 5);
  CHECK(m.link.h2d.points[0] == BandwidthPoint{4 * kKiB, 0.4});
  CHECK(m.link.h2d.points[4] == BandwidthPoint{32 * kMiB, 24.8});
  CHECK(m.link.d2h.points[1] == BandwidthPoint{32 * kKiB, 3.0});
  CHECK(m.link.d2h.points[4] == BandwidthPoint{32 * kMiB, 25.6});
  // 42.72 GB/s both ways against 24.8 + 25.6 one way each.
  CHECK(m.link.duplex_factor == doctest::Approx(42.72 / 50.4));
  CHECK(m.link.name == "PCIe gen4 x16 to NVIDIA GeForce RTX 4090");

  CHECK(m.nvme.capacity_bytes == 2000 * kGiB);
  CHECK(m.nvme.name == "ext4 at /data/kv");
  // 32 KiB at 0.5 GB/s = 65.536 us.
  CHECK(m.nvme.latency_us == doctest::Approx(65.536));
  REQUIRE(m.nvme.read.points.size() == 8);
  REQUIRE(m.nvme.write.points.size() == 8);
  CHECK(m.nvme.read.points[0] == NvmePoint{32 * kKiB, 1, 0.5});
  CHECK(m.nvme.read.points[3] == NvmePoint{32 * kKiB, 64, 6.0});
  CHECK(m.nvme.read.points[4] == NvmePoint{kMiB, 1, 2.0});
  CHECK(m.nvme.read.points[7] == NvmePoint{kMiB, 64, 7.1});
  CHECK(m.nvme.write.points[2] == NvmePoint{32 * kKiB, 32, 5.8});
  CHECK(m.nvme.write.points[7] == NvmePoint{kMiB, 64, 6.6});
  CHECK(m.nvme.read_gbps_at(kMiB, 32) == doctest::Approx(7.0));
}

TEST_CASE("the executor's step overhead is what the other terms leave, never negative") {
  BenchReports r = reports(true);
  r.executor = executor_report(400);  // less than prepare + plan + scoring + waits
  const MachineProfile m = calibrated(facts(true), r, inputs());
  CHECK(m.host.step_overhead_us == 0.0);
  CHECK(m.host.prepare_us_per_list == doctest::Approx(12.0));
}

TEST_CASE("an executor run whose GPU scored the summaries leaves no CPU scoring to subtract") {
  BenchReports r = reports(true);
  r.executor = executor_report(900, 0);
  const MachineProfile m = calibrated(facts(true), r, inputs());
  // The CPU's top-k over the downloaded scores is still priced at its rate.
  CHECK(m.host.step_overhead_us == doctest::Approx(900.0 - 96 - 256 - 40 - 20));
  r.executor = executor_report(900, -1);
  CHECK(contains(error_of(facts(true), r, inputs()), "executor_score_bytes_per_layer_step' (for host.step_overhead_us) = -1"));
  CHECK(contains(error_of(facts(true), r, inputs()), "must be >= 0"));
}

TEST_CASE("every part's source names the date and the results it came from") {
  const MachineProfile m = calibrated(facts(true), reports(true), inputs());
  for (const std::string* source : {&m.gpu.source, &m.link.source, &m.host.source, &m.nvme.source}) {
    CAPTURE(*source);
    CHECK(contains(*source, "measured by kvtier calibrate 2026-11-28"));
  }
  CHECK(contains(m.host.source, "host.read_gbps = memory:read_gbps_all_threads"));
  CHECK(contains(m.host.source, "host.score_gbps = cpu:summary_scoring_1m"));
  CHECK(contains(m.host.source, "host.plan_us_per_block = executor_plan_us / executor_selected_blocks_per_layer_step"));
  CHECK(contains(m.host.source, "context_tokens = 32768"));
  CHECK(contains(m.gpu.source, "gpu.hbm_read_gbps = gpu:hbm_copy_bw"));
  CHECK(contains(m.gpu.source, "gpu.bf16_tflops = gpu:cublas_bf16_gemm"));
  CHECK(contains(m.link.source, "h2d_copy_4kib"));
  CHECK(contains(m.link.source, "h2d_d2h_duplex_32mib"));
  CHECK(contains(m.nvme.source, "uring_seq_read_1m_qd8"));
  CHECK(contains(m.nvme.source, "uring_rand_block_read_qd1"));
}

TEST_CASE("the calibrated profile round-trips through to_json and parse") {
  for (const bool with_gpu : {true, false}) {
    CAPTURE(with_gpu);
    const MachineProfile m = calibrated(facts(with_gpu), reports(with_gpu), inputs(with_gpu ? "" : "rtx4090"));
    const json j = to_json(m);
    Result<MachineProfile> back = parse_machine_profile_json(json::parse(j.dump()), "calibrated.json");
    INFO(back.status().to_string());
    REQUIRE(back.ok());
    CHECK(*back == m);
    CHECK(validate(*back).ok());
  }
}

TEST_CASE("a missing result is an error naming the suite and the result") {
  struct Case {
    const char* suite;
    const char* result;
  };
  for (const Case& c : {Case{"memory", "read_gbps_all_threads"}, Case{"cpu", "summary_scoring_1m"},
                        Case{"cpu", "block_attention_host"}, Case{"storage", "uring_seq_read_1m_qd1"},
                        Case{"storage", "uring_block_write_qd64"}, Case{"storage", "h2d_copy_256kib"},
                        Case{"storage", "h2d_d2h_duplex_32mib"}, Case{"gpu", "hbm_copy_bw"},
                        Case{"gpu", "cublas_bf16_gemm"}, Case{"executor", "executor_plan_us"},
                        Case{"executor", "executor_score_bytes_per_layer_step"}, Case{"cpu", "topk_1m_scores"},
                        Case{"executor", "executor_topk_bytes_per_layer_step"},
                        Case{"executor", "executor_prefill_stage_ms"}}) {
    CAPTURE(c.result);
    BenchReports r = reports(true);
    json& target = std::string(c.suite) == "memory"     ? r.memory
                   : std::string(c.suite) == "cpu"      ? r.cpu
                   : std::string(c.suite) == "storage"  ? r.storage
                   : std::string(c.suite) == "executor" ? r.executor
                                                        : r.gpu;
    json& results = target["results"];
    const size_t before = results.size();
    for (auto it = results.begin(); it != results.end(); ++it)
      if ((*it)["name"] == c.result) {
        results.erase(it);
        break;
      }
    REQUIRE(results.size() == before - 1);
    const std::string e = error_of(facts(true), r, inputs());
    CHECK(contains(e, "the " + std::string(c.suite) + " report has no result '" + c.result + "'"));
  }
}

TEST_CASE("a malformed report or result is an error naming it") {
  BenchReports r = reports(true);
  r.gpu["results"][2]["unit"] = "GFLOP/s";
  CHECK(contains(error_of(facts(true), r, inputs()), "'cublas_bf16_gemm' (for gpu.bf16_tflops) is in 'GFLOP/s'"));
  r = reports(true);
  r.memory["results"][1]["value"] = 0;
  CHECK(contains(error_of(facts(true), r, inputs()), "read_gbps_all_threads"));
  r = reports(true);
  r.cpu = report("memory", {});
  CHECK(contains(error_of(facts(true), r, inputs()), "the cpu report has \"bench\": \"memory\""));
  r = reports(true);
  r.storage = json::array();
  CHECK(contains(error_of(facts(true), r, inputs()), "the storage report is not a JSON object"));
}

TEST_CASE("without a GPU the gpu and link parts need a preset") {
  const std::string e = error_of(facts(false), reports(false), inputs());
  CHECK(contains(e, "no GPU"));
  CHECK(contains(e, "no CUDA device"));
  CHECK(contains(e, "--gpu"));
  CHECK(contains(e, "rtx4090"));
  CHECK(contains(e, "--gpu cpu-standin"));
  CHECK(contains(error_of(facts(false), reports(false), inputs("gtx480")), "unknown GPU preset 'gtx480'"));
}

// The reports of a machine without a GPU, whose executor suite ran on the CPU stand-in.
BenchReports standin_reports() {
  BenchReports r = reports(false);
  r.executor = executor_report(900, 4.85e6, "backend cpu; gpu tier 2 GiB (65536 slots)");
  return r;
}

TEST_CASE("--gpu cpu-standin measures kvtier's CPU stand-in for the gpu and link parts") {
  const MachineProfile m = calibrated(facts(false), standin_reports(), inputs("cpu-standin"));
  CHECK(validate(m).ok());
  CHECK(m.gpu.cpu_standin);
  CHECK(contains(m.gpu.name, "CPU stand-in"));
  CHECK(contains(m.gpu.name, "AMD Ryzen 9 7950X"));
  CHECK(m.gpu.hbm_read_gbps == 47.0);    // the cpu suite's block attention
  CHECK(m.gpu.bf16_tflops == 0.42);      // the executor suite's prefill attention
  CHECK(m.gpu.memory_bytes == 128 * kGiB);
  CHECK(m.gpu.sm_count == 16);
  REQUIRE(m.link.h2d.points.size() == 1);
  CHECK(m.link.h2d.points[0] == BandwidthPoint{32 * kMiB, 22.0});  // 44 GB/s read + written: 22 moved
  CHECK(m.link.d2h.points[0] == BandwidthPoint{32 * kMiB, 22.0});
  CHECK(m.link.duplex_factor == 0.5);
  CHECK(contains(m.gpu.source, "measured by kvtier calibrate 2026-11-28 with --gpu cpu-standin"));
  CHECK(contains(m.gpu.source, "executor:executor_prefill_attention_tflops"));
  CHECK(contains(m.link.source, "memory:copy_gbps_all_threads"));
  // It round-trips, the stand-in mark included.
  Result<MachineProfile> back = parse_machine_profile_json(json::parse(to_json(m).dump()), "standin.json");
  REQUIRE(back.ok());
  CHECK(*back == m);
  // Without the figures it needs, the error names them.
  BenchReports r = standin_reports();
  r.executor["results"].erase(r.executor["results"].end() - 1);
  CHECK(contains(error_of(facts(false), r, inputs("cpu-standin")),
                 "the executor report has no result 'executor_prefill_attention_tflops'"));
  // An executor suite that ran on a GPU measured the GPU's prefill, not the stand-in's.
  const std::string on_gpu = error_of(facts(false), reports(false), inputs("cpu-standin"));
  CHECK(contains(on_gpu, "config.backend is 'cuda:0"));
  CHECK(contains(on_gpu, "CUDA_VISIBLE_DEVICES"));
  r = standin_reports();
  r.memory["results"].erase(r.memory["results"].end() - 1);
  CHECK(contains(error_of(facts(false), r, inputs("cpu-standin")),
                 "the memory report has no result 'copy_gbps_all_threads'"));
}

TEST_CASE("a GPU preset fills the gpu and link parts, marked as not measured") {
  const MachineProfile m = calibrated(facts(false), reports(false), inputs("rtx4090"));
  const MachineProfile preset = compose_machine("rtx4090,ddr5-64g,nvme-gen4").value();
  CHECK(m.gpu.name == "rtx4090");
  CHECK(m.gpu.hbm_read_gbps == preset.gpu.hbm_read_gbps);
  CHECK(m.gpu.memory_bytes == preset.gpu.memory_bytes);
  CHECK(m.link.h2d == preset.link.h2d);
  CHECK(m.link.duplex_factor == preset.link.duplex_factor);
  CHECK(contains(m.gpu.source, "not measured: preset given to kvtier calibrate 2026-11-28 with --gpu rtx4090"));
  CHECK(contains(m.link.source, "not measured"));
  CHECK(contains(m.link.source, preset.link.source));
  // The host and NVMe parts are still measured.
  CHECK(m.host.read_gbps == 61.0);
  CHECK(m.nvme.read.points.size() == 8);
  // A preset also replaces a GPU that is present: no gpu report or link figures needed.
  const MachineProfile replaced = calibrated(facts(true), reports(false), inputs("h200"));
  CHECK(replaced.gpu.name == "h200");
}

TEST_CASE("host.cores falls back to the cpu suite's threads without a topology") {
  MachineFacts f = facts(true);
  f.topology.reset();
  f.topology_error = "hwloc failed";
  CHECK(calibrated(f, reports(true), inputs()).host.cores == 16);
  BenchReports r = reports(true);
  r.cpu["config"].erase("threads");
  CHECK(contains(error_of(f, r, inputs()), "hwloc failed"));
}

TEST_CASE("calibration_rules lists every measured field once") {
  const std::vector<CalibrationRule> rules = calibration_rules();
  // 6 scalars, 6 executor host times, 5 link sizes x 2 directions, duplex, 8 x 2 NVMe points, latency,
  // and the CPU stand-in's 3 (attention, prefill attention, copies).
  CHECK(rules.size() == 6 + 6 + 10 + 1 + 16 + 1 + 3);
  for (size_t i = 0; i < rules.size(); ++i)
    for (size_t k = i + 1; k < rules.size(); ++k) CHECK(rules[i].field != rules[k].field);
  const auto has = [&](std::string_view field, std::string_view result) {
    for (const CalibrationRule& r : rules)
      if (r.field == field && r.result == result) return true;
    return false;
  };
  CHECK(has("host.read_gbps", "read_gbps_all_threads"));
  CHECK(has("host.step_overhead_us", "executor_layer_step_us"));
  CHECK(has("host.attend_call_us", "executor_host_cpu_call_us"));
  CHECK(has("host.topk_gbps", "topk_1m_scores"));
  CHECK(has("link.h2d[32 MiB].gbps", "h2d_single_copy_32mib"));
  CHECK(has("nvme.read[1 MiB, QD64].gbps", "ceiling_seq_read_1m_qd64"));
  CHECK(has("nvme.write[32 KiB, QD32].gbps", "uring_block_write_qd32"));
  CHECK(has("gpu.bf16_tflops (cpu-standin)", "executor_prefill_attention_tflops"));
}
