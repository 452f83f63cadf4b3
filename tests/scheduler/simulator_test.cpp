// The memory-tier simulator: capacity numbers checked by hand for
// Llama-3.1-8B at 1M tokens on an RTX 4090 workstation, overflow naming the
// tier with a consistent largest context, monotone and ordered speed
// predictions, lane accounting, the JSON keys, and bad input named.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kvtier/scheduler/simulator.h"

using namespace kvtier;
using namespace kvtier::scheduler;

namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

SimModel llama_8b() {
  SimModel m;
  m.name = "llama-3.1-8b";
  m.shape = llama31_8b_shape();
  m.parameters = 8'030'261'248;  // the published count (runtime/model_catalog.cpp reproduces it)
  m.weights_bytes = 2 * m.parameters;
  m.max_positions = 131072;
  return m;
}

SimInputs inputs(const std::string& machine = "rtx4090,ddr5-128g,nvme-gen4", uint64_t context = 1ull << 20,
                 uint32_t batch = 1) {
  SimInputs in;
  in.model = llama_8b();
  in.context_tokens = context;
  in.batch = batch;
  Result<MachineProfile> m = compose_machine(machine);
  REQUIRE_MESSAGE(m.ok(), m.status().to_string());
  in.machine = *m;
  return in;
}

PlanReport run(const SimInputs& in) {
  Result<PlanReport> r = simulate(in);
  REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  return *r;
}

// 128K tokens on an H200 with 8 GiB for KV and 5 GiB of host homes: the rest
// of the far blocks are homed on NVMe. Overlap 0.5.
SimInputs nvme_homes_128k() {
  SimInputs in = inputs("h200,ddr5-512g,nvme-gen5", 131072);
  in.gpu_budget_bytes = 8 * kGiB;
  in.host_budget_bytes = 5 * kGiB;
  in.selection_overlap = 0.5;
  return in;
}

}  // namespace

TEST_CASE("capacity of llama-3.1-8b at 1M on rtx4090,ddr5-128g,nvme-gen4, by hand") {
  const PlanReport r = run(inputs());
  const Capacity& c = r.cap;
  // 32 layers x 8 KV heads x 16384 blocks of 32 KiB; summaries 256 B (128 bf16, the default) per block and head.
  CHECK(c.block_bytes == 32768);
  CHECK(c.kv_bytes == 128 * kGiB);
  CHECK(c.summary_bytes == 1 * kGiB);
  CHECK(r.weights_bytes == 16'060'522'496);  // ~16 GB
  // GPU: 24564 MiB - weights - (2 GiB + 10%) = 4973492633 B for KV.
  const Placement& p = c.placement;
  const double gpu_mem = 24564.0 * kMiB;
  CHECK(p.gpu_budget_bytes == static_cast<uint64_t>(gpu_mem - 16'060'522'496.0 - 2.0 * kGiB - 0.1 * gpu_mem));
  CHECK(p.gpu_budget_bytes == 4'973'492'633);
  // Hot set: 2 sink + 64 window + 1 blocks per (layer, KV head) = 67 x 256 x 32 KiB = 536 MiB.
  CHECK(p.gpu_hot_bytes == 67ull * 256 * 32768);
  // The GPU scores: the 1 GiB of mean keys fits a quarter of the budget and
  // comes out of the block cache.
  CHECK(p.gpu_summary_bytes == 1 * kGiB);
  CHECK(p.gpu_cache_blocks == (4'973'492'633 - 67ull * 256 * 32768 - kGiB) / 32768);
  CHECK(p.gpu_cache_blocks == 101858);
  // Host: 80% of 128 GiB minus the 1 GiB of summaries = 101.4 GiB = 3322675 blocks.
  CHECK(p.host.blocks == 3'322'675);
  CHECK(p.gpu.blocks == 67ull * 256 + 101858);
  CHECK(p.nvme.blocks == 4'194'304 - p.gpu.blocks - p.host.blocks);
  CHECK(p.gpu.bytes + p.host.bytes + p.nvme.bytes == c.kv_bytes);
  CHECK(p.nvme_home_bytes == (p.nvme.blocks + p.gpu.blocks) * 32768);
  CHECK(c.fits);
  CHECK(c.overflow_tier.empty());
  CHECK(r.max_context_tokens_that_fits > (1ull << 20));
  CHECK(!r.warnings.empty());  // beyond the model's 128K trained positions
}

TEST_CASE("decode scoring: on the GPU where the mean keys fit a quarter of the budget, else on the CPU") {
  SimInputs in = inputs();
  const PlanReport gpu = run(in);
  in.score_on_gpu = false;
  const PlanReport cpu = run(in);
  CHECK(cpu.cap.placement.gpu_summary_bytes == 0);
  CHECK(cpu.cap.placement.gpu_cache_blocks == (4'973'492'633 - 67ull * 256 * 32768) / 32768);
  // A min/max table is scored by its bound rule, which only the CPU runs.
  in.score_on_gpu = true;
  in.policy.summary_kind = SummaryKind::kMinMaxF32;
  CHECK(run(in).cap.placement.gpu_summary_bytes == 0);
  // Too small a budget for a quarter to hold the keys: the CPU scores.
  in.policy.summary_kind = SummaryKind::kMeanBf16;
  in.gpu_budget_bytes = 3 * kGiB;
  CHECK(run(in).cap.placement.gpu_summary_bytes == 0);
  in.gpu_budget_bytes = 4 * kGiB;
  CHECK(run(in).cap.placement.gpu_summary_bytes == kGiB);
  // Scoring moves from ~0.4 ms of host memory per layer step to microseconds
  // of HBM: the step is faster though the block cache is 1 GiB smaller.
  CHECK(gpu.step_us_attention < cpu.step_us_attention);
  const auto scoring = [](const PlanReport& r) { return to_json(r)["decode_scoring"].get<std::string>(); };
  CHECK(scoring(gpu) == "gpu");
  CHECK(scoring(cpu) == "cpu");
}

TEST_CASE("too small an NVMe drive overflows the nvme tier, and the largest context is consistent") {
  SimInputs in = inputs();
  in.machine.nvme.capacity_bytes = 10 * kGiB;
  const PlanReport r = run(in);
  CHECK(!r.cap.fits);
  CHECK(r.cap.overflow_tier == "nvme");
  CHECK(r.cap.overflow_reason.find("NVMe") != std::string::npos);
  const uint64_t max = r.max_context_tokens_that_fits;
  REQUIRE(max > 0);
  CHECK(max < in.context_tokens);
  CHECK(max % in.policy.chunk_tokens == 0);
  in.context_tokens = max;
  CHECK(run(in).cap.fits);
  in.context_tokens = max + in.policy.chunk_tokens;
  const PlanReport over = run(in);
  CHECK(!over.cap.fits);
  CHECK(over.cap.overflow_tier == "nvme");
}

TEST_CASE("weights too big for the GPU overflow the gpu tier at every context") {
  SimInputs in = inputs();
  in.model.weights_bytes = 30 * kGiB;  // more than the 24 GiB card
  in.model.parameters = in.model.weights_bytes / 2;
  const PlanReport r = run(in);
  CHECK(!r.cap.fits);
  CHECK(r.cap.overflow_tier == "gpu");
  CHECK(r.max_context_tokens_that_fits == 0);
}

TEST_CASE("decode tokens/s does not grow with context on one machine") {
  double last_attention = 1e300, last_full = 1e300;
  for (uint64_t tokens = 128 * 1024; tokens <= (8ull << 20); tokens *= 2) {
    CAPTURE(tokens);
    const PlanReport r = run(inputs("rtx4090,ddr5-128g,nvme-gen4", tokens));
    CHECK(r.decode_tokens_per_s_attention > 0);
    CHECK(r.decode_tokens_per_s_attention <= last_attention);
    CHECK(r.decode_tokens_per_s_full_model <= last_full);
    CHECK(r.decode_tokens_per_s_full_model < r.decode_tokens_per_s_attention);
    last_attention = r.decode_tokens_per_s_attention;
    last_full = r.decode_tokens_per_s_full_model;
  }
}

TEST_CASE("a faster GPU never predicts slower decode or prefill") {
  for (uint64_t tokens : {128ull * 1024, 1ull << 20, 4ull << 20}) {
    CAPTURE(tokens);
    const PlanReport slow = run(inputs("rtx4090,ddr5-256g,nvme-gen5", tokens));
    for (const char* gpu : {"rtx5090", "h100-sxm", "h200"}) {
      CAPTURE(gpu);
      const PlanReport fast = run(inputs(std::string(gpu) + ",ddr5-256g,nvme-gen5", tokens));
      CHECK(fast.decode_tokens_per_s_attention >= slow.decode_tokens_per_s_attention);
      CHECK(fast.decode_tokens_per_s_full_model >= slow.decode_tokens_per_s_full_model);
      CHECK(fast.prefill_seconds <= slow.prefill_seconds);
    }
  }
}

TEST_CASE("batch 8 gives more total tokens/s than batch 1") {
  // Full model: the weights are read once per step for the whole batch.
  for (const char* machine : {"rtx4090,ddr5-256g,nvme-gen4", "h200,ddr5-512g,nvme-gen5"}) {
    CAPTURE(machine);
    const PlanReport one = run(inputs(machine, 128 * 1024, 1));
    const PlanReport eight = run(inputs(machine, 128 * 1024, 8));
    CHECK(eight.decode_tokens_per_s_full_model > one.decode_tokens_per_s_full_model);
    CHECK(eight.cap.kv_bytes == 8 * one.cap.kv_bytes);
  }
  // Attention alone gains only from the decode kernel's better efficiency at
  // larger batches, so only where the GPU cache still holds the batch's
  // working set (on the RTX 4090, eight hot sets squeeze the cache: slower).
  const PlanReport one = run(inputs("h200,ddr5-512g,nvme-gen5", 128 * 1024, 1));
  const PlanReport eight = run(inputs("h200,ddr5-512g,nvme-gen5", 128 * 1024, 8));
  CHECK(eight.decode_tokens_per_s_attention > one.decode_tokens_per_s_attention);
}

TEST_CASE("lanes: the bottleneck is a lane, utilisations lie in [0, 1], traffic adds up") {
  for (const char* machine : {"rtx4090,ddr5-128g,nvme-gen4", "h200,ddr5-512g,nvme-gen5", "rtx4090,ddr4-64g,nvme-gen4"}) {
    CAPTURE(machine);
    SimInputs in = inputs(machine);
    for (LatePolicy late : {LatePolicy::kWait, LatePolicy::kSummary}) {
      in.late = late;
      const PlanReport r = run(in);
      REQUIRE(r.lanes.size() == 5);
      bool found = false;
      double top = 0;
      for (const LaneUse& l : r.lanes) {
        CHECK(l.utilisation >= 0);
        CHECK(l.utilisation <= 1);
        top = std::max(top, l.busy_us);
        found |= l.lane == r.bottleneck.lane;
      }
      CHECK(found);
      CHECK(r.bottleneck.busy_us == top);
      CHECK(r.bottleneck.utilisation <= 1);
      CHECK(r.prefill_bottleneck.utilisation <= 1);
      CHECK(r.prefill_seconds > 0);
      CHECK(r.prefill_seconds_attention > 0);
      CHECK(r.prefill_seconds_attention <= r.prefill_seconds);
      CHECK(r.step_us_attention > 0);
      // Full model = attention + the slower of weights and GEMMs.
      const double weights_us = 16'060'522'496.0 / (in.machine.gpu.hbm_read_gbps * 1e3);
      CHECK(r.step_us_full_model >= r.step_us_attention + weights_us - 1e-6);
      CHECK(r.selection.gpu_share + r.selection.host_share + r.selection.nvme_share == doctest::Approx(1.0));
    }
  }
}

TEST_CASE("late=summary: late blocks' reads hold the drive but not the step, and an oversubscribed drive is named") {
  SimInputs in = inputs("rtx4090,ddr4-64g,nvme-gen4");
  for (NvmePoint& p : in.machine.nvme.read.points) p.gbps /= 20;  // a drive slower than the step
  in.late = LatePolicy::kWait;
  const PlanReport wait = run(in);
  in.late = LatePolicy::kSummary;
  const PlanReport summary = run(in);
  const auto nvme_busy = [](const PlanReport& r) {
    for (const LaneUse& l : r.lanes)
      if (l.lane == "nvme") return l.busy_us;
    FAIL("no nvme lane");
    return 0.0;
  };
  const auto warned = [](const PlanReport& r) {
    return std::any_of(r.warnings.begin(), r.warnings.end(),
                       [](const std::string& w) { return w.find("the drive needs") != std::string::npos; });
  };
  REQUIRE(summary.late_blocks_per_step > 0);
  // Under wait the step includes its reads; under summary the late ones run
  // beside later steps, so the step is shorter than the drive's work.
  CHECK(wait.step_us_attention >= nvme_busy(wait));
  CHECK_FALSE(warned(wait));
  CHECK(summary.step_us_attention < 0.5 * nvme_busy(summary));
  CHECK(summary.step_us_attention < 0.5 * wait.step_us_attention);
  CHECK(warned(summary));
}

TEST_CASE("selection without NVMe homes: one LRU cache over the far blocks, by hand") {
  SimInputs in = inputs("h200,ddr5-512g,nvme-gen5", 131072);
  in.gpu_budget_bytes = 8 * kGiB;  // host RAM holds every home
  in.selection_overlap = 0.5;
  const PlanReport r = run(in);
  const Placement& p = r.cap.placement;
  REQUIRE(p.nvme.blocks == 0);
  // 128K tokens: 2048 chunks per list, 66 hot (2 sinks + 64 window); far range [2, 1984).
  const double lists = 32.0 * 8, far = lists * 1982, w = lists * 64;
  const double cache = static_cast<double>(p.gpu_cache_blocks);
  // The mean keys the GPU scores (2048 rows of 256 B per list) come out of the cache.
  CHECK(p.gpu_summary_bytes == lists * 2048 * 256);
  CHECK(cache == doctest::Approx((8.0 * kGiB - lists * 67 * 32768 - lists * 2048 * 256) / 32768).epsilon(1e-9));
  const double n = (cache - w) / (far - w);
  CHECK(r.selection.new_gpu_share == doctest::Approx(n));
  CHECK(r.selection.gpu_share == doctest::Approx(0.5 + 0.5 * n));  // the cache holds all of last step's W
  CHECK(r.selection.nvme_share == 0);
  CHECK(r.selection.nvme_homed_share == 0);
}

TEST_CASE("selection with NVMe homes: the GPU cache keeps NVMe-homed copies, by hand") {
  SimInputs in = nvme_homes_128k();
  const PlanReport r = run(in);
  const Placement& p = r.cap.placement;
  REQUIRE(p.nvme.blocks > 0);
  const double lists = 32.0 * 8, far = lists * 1982;
  const double cache = static_cast<double>(p.gpu_cache_blocks);
  const double hh = static_cast<double>(p.host.blocks), hn = far - hh;
  REQUIRE(cache < hn);  // every cache slot holds an NVMe-homed copy
  const double kappa = cache / hn, h = hh / far, o = 0.5;
  CHECK(r.selection.nvme_homed_share == doctest::Approx(1 - h));
  CHECK(r.selection.nvme_homed_cached_share == doctest::Approx(kappa));
  CHECK(r.selection.staging_hit_share == 0);  // no staging cache given
  // Without staging: N = (1 - o)(1 - kappa), St = o N / (1 - o (1 - u)), G = 1 - St - N.
  const double u = r.selection.staged_upload_share;
  CHECK(u > 0);
  CHECK(u <= 1);
  const double n = (1 - o) * (1 - kappa), st = o * n / (1 - o * (1 - u)), g = 1 - st - n;
  CHECK(r.selection.nvme_share == doctest::Approx((1 - h) * n));
  // Host-homed copies get no room (the cache is all NVMe-homed), so only NVMe homes hit.
  CHECK(r.selection.gpu_share == doctest::Approx((1 - h) * g));
  CHECK(r.selection.gpu_share + r.selection.host_share + r.selection.nvme_share == doctest::Approx(1.0));
}

TEST_CASE("selection with NVMe homes: a staging cache turns reads into host hits, and more of it more") {
  SimInputs in = nvme_homes_128k();
  const PlanReport none = run(in);
  double last_nvme = none.selection.nvme_share;
  for (const uint64_t staging : {uint64_t{256} << 20, uint64_t{1} << 30, uint64_t{3} << 30}) {
    CAPTURE(staging);
    in.host_cache_bytes = staging;
    const PlanReport r = run(in);
    const SelectionModel& s = r.selection;
    CHECK(s.staging_hit_share > 0);
    CHECK(s.staging_hit_share <= 1 - s.nvme_homed_cached_share);
    CHECK(s.nvme_share < last_nvme);
    last_nvme = s.nvme_share;
    // s solves its equation: S phi / (H_n - K_n), phi from the reads it leaves.
    const Placement& p = r.cap.placement;
    const double lists = 32.0 * 8, far = lists * 1982, w = lists * 64, o = 0.5;
    const double hn = far - static_cast<double>(p.host.blocks), kn = static_cast<double>(p.gpu_cache_blocks);
    const double h1 = s.nvme_homed_share, kappa = s.nvme_homed_cached_share;
    const double blocks = static_cast<double>(staging) / 32768;
    const double reads = w * h1 * (1 - o) * (1 - kappa - s.staging_hit_share);
    const double q = w * (1 - o) * h1 / hn, stay = blocks / reads;
    const double phi = (1 - std::pow(1 - q, stay)) / (stay * q);
    CHECK(s.staging_hit_share == doctest::Approx(std::min(1 - kappa, blocks * phi / (hn - kn))).epsilon(1e-4));
    CHECK(s.gpu_share + s.host_share + s.nvme_share == doctest::Approx(1.0));
  }
  in.host_cache_bytes = uint64_t{600} * kGiB;  // with the 5 GiB homes, more than the host has
  CHECK(!simulate(in).ok());
  in.host_cache_bytes = UINT64_MAX;  // no wrap-around lets it through
  CHECK(!simulate(in).ok());
  // The default host budget (80% of 512 GiB less summaries) counts too.
  in.host_budget_bytes.reset();
  in.host_cache_bytes = uint64_t{120} * kGiB;
  const Result<PlanReport> over = simulate(in);
  REQUIRE(!over.ok());
  CHECK(over.status().message().find("host_cache_bytes") != std::string::npos);
  in.host_cache_bytes = uint64_t{60} * kGiB;
  CHECK(simulate(in).ok());
  in.batch = 2;  // one staging cache per sequence: 120 GiB again
  const Result<PlanReport> two = simulate(in);
  REQUIRE(!two.ok());
  CHECK(two.status().message().find("host_cache_bytes") != std::string::npos);
}

TEST_CASE("rates follow the profile with the stated fractions") {
  const SimInputs in = inputs();
  const CostRates r = rates_from_profile(in.machine, in.model.shape, in.policy, 1);
  CHECK(r.gpu_attend_gbps == doctest::Approx(1008 * 0.394));
  CHECK(rates_from_profile(in.machine, in.model.shape, in.policy, 16).gpu_attend_gbps == doctest::Approx(1008 * 0.981));
  CHECK(gpu_attend_fraction(4) == doctest::Approx(0.764));
  CHECK(gpu_attend_fraction(2) > 0.394);
  CHECK(gpu_attend_fraction(2) < 0.764);
  CHECK(gpu_attend_fraction(64) == doctest::Approx(0.981));
  CHECK(r.h2d_gbps == doctest::Approx(0.9 * in.machine.link.gbps_at(LinkDirection::kHostToDevice, 32 * kMiB)));
  CHECK(r.nvme_read_gbps == doctest::Approx(in.machine.nvme.read_gbps_at(32768, 32)));
  CHECK(r.launch_us == 5.0);
  CHECK(validate(r).ok());
}

TEST_CASE("the CPU stand-in: the GPU's and copies' work shares the cpu lane, at its measured rates") {
  SimInputs gpu = nvme_homes_128k();
  gpu.score_on_gpu = false;  // the stand-in scores on the CPU: compare like with like
  SimInputs standin = gpu;
  standin.machine.gpu.cpu_standin = true;
  standin.machine.gpu.hbm_read_gbps = 30;
  standin.machine.gpu.bf16_tflops = 0.4;
  // A GPU whose kernels reach the same rates after their fractions: the same plans.
  gpu.machine.gpu.hbm_read_gbps = 30 / gpu_attend_fraction(1);
  gpu.machine.gpu.bf16_tflops = 0.4 / 0.285;
  const CostRates r = rates_from_profile(standin.machine, standin.model.shape, standin.policy, 1);
  CHECK(r.gpu_attend_gbps == 30.0);  // measured as run: no kernel curve
  const PlanReport a = run(gpu), b = run(standin);
  const auto busy = [](const PlanReport& p, const std::string& lane) {
    for (const LaneUse& l : p.lanes)
      if (l.lane == lane) return l.busy_us;
    FAIL("no lane " << lane);
    return 0.0;
  };
  // The same plan (rates alike), its GPU and copy work moved onto the cores.
  CHECK(busy(b, "gpu") == 0.0);
  CHECK(busy(b, "copy_h2d") == 0.0);
  CHECK(busy(b, "copy_d2h") == 0.0);
  CHECK(busy(b, "cpu") ==
        doctest::Approx(busy(a, "cpu") + busy(a, "gpu") + busy(a, "copy_h2d") + busy(a, "copy_d2h")).epsilon(1e-9));
  CHECK(busy(b, "nvme") == doctest::Approx(busy(a, "nvme")));
  CHECK(b.step_us_attention >= busy(b, "cpu") - 1e-6);  // one queue: at least its busy time
  CHECK(b.step_us_attention > a.step_us_attention);
  CHECK(b.bottleneck.lane == "cpu");
  // Scoring stays on the CPU even where a GPU would score.
  standin.score_on_gpu = true;
  CHECK(run(standin).cap.placement.gpu_summary_bytes == 0);
  CHECK(to_json(run(standin))["decode_scoring"] == "cpu");
  // Prefill: attention at bf16_tflops as measured (the GPU's kernel fraction
  // is not applied), with the copies to host homes in the chain, not beside
  // it; the parts still add up.
  const PlanReport::PrefillParts& pa = a.prefill_parts;
  const PlanReport::PrefillParts& pb = b.prefill_parts;
  CHECK(pb.attention > pa.attention);
  CHECK(pb.attention < 1.5 * pa.attention);
  CHECK(b.prefill_seconds_attention > a.prefill_seconds_attention);
  CHECK(pb.stage + pb.query + pb.fetch + pb.attention + pb.home_write_exposed ==
        doctest::Approx(b.prefill_seconds_attention).epsilon(1e-12));
  bool said = false;
  for (const std::string& s : b.assumptions) said = said || s.find("CPU stand-in") != std::string::npos;
  CHECK(said);
}

TEST_CASE("prefill parts add up to the attention-only prefill, and a slow drive's home writes show") {
  SimInputs in = inputs("rtx4090,ddr5-128g,nvme-gen4");
  const PlanReport r = run(in);
  const PlanReport::PrefillParts& p = r.prefill_parts;
  CHECK(p.stage > 0);
  CHECK(p.query > 0);
  CHECK(p.attention > 0);
  CHECK(p.fetch > 0);  // 1M does not fit the GPU cache: selected far blocks are fetched
  CHECK(p.stage + p.query + p.fetch + p.attention + p.home_write_exposed ==
        doctest::Approx(r.prefill_seconds_attention).epsilon(1e-12));
  // At 1M on 128 GB of RAM most homes are on NVMe: a drive that writes 50x
  // slower than the preset cannot keep up behind the blocks' work.
  for (NvmePoint& w : in.machine.nvme.write.points) w.gbps /= 50;
  const PlanReport slow = run(in);
  CHECK(slow.prefill_parts.home_write_exposed > 0);
  CHECK(slow.prefill_parts.home_write_exposed > r.prefill_parts.home_write_exposed);
  CHECK(slow.prefill_seconds_attention ==
        doctest::Approx(r.prefill_seconds_attention - r.prefill_parts.home_write_exposed +
                        slow.prefill_parts.home_write_exposed)
            .epsilon(1e-9));
  const nlohmann::json j = to_json(slow);
  CHECK(j["prefill_parts_seconds"]["home_write_exposed"].get<double>() == slow.prefill_parts.home_write_exposed);
}

TEST_CASE("to_json has the documented keys") {
  const nlohmann::json j = to_json(run(inputs()));
  for (const char* key : {"fits", "placement", "decode_tokens_per_s", "prefill_seconds", "bottleneck", "kv_bytes",
                          "summary_bytes", "weights_bytes", "traffic_per_step", "lanes", "assumptions",
                          "max_context_tokens_that_fits", "selection"})
    CHECK_MESSAGE(j.contains(key), key);
  CHECK(j["fits"].is_boolean());
  CHECK(j["placement"]["gpu"]["bytes"].get<uint64_t>() + j["placement"]["host"]["bytes"].get<uint64_t>() +
            j["placement"]["nvme"]["bytes"].get<uint64_t>() ==
        j["kv_bytes"].get<uint64_t>());
  CHECK(j["decode_tokens_per_s"]["attention_tiering"].get<double>() > 0);
  CHECK(j["decode_tokens_per_s"]["full_model"].get<double>() > 0);
  CHECK(j["bottleneck"]["lane"].is_string());
  CHECK(j["selection"]["source"] == "modeled");
  CHECK(j["assumptions"].size() >= 10);
}

TEST_CASE("measured selection shares replace the modeled ones, and the same shares time the same") {
  SimInputs in = nvme_homes_128k();
  in.host_cache_bytes = 1 * kGiB;
  const PlanReport modeled = run(in);
  CHECK_FALSE(modeled.selection.measured);
  // The modeled shares, given back as measured: the same plan and time (the
  // planner's upload share u is then not iterated, so allow for that).
  in.selection_shares = MeasuredSelection{modeled.selection.gpu_share, modeled.selection.nvme_share};
  const PlanReport same = run(in);
  CHECK(same.selection.measured);
  CHECK(same.selection.gpu_share == modeled.selection.gpu_share);
  CHECK(same.selection.host_share == doctest::Approx(modeled.selection.host_share));
  CHECK(same.step_us_attention == doctest::Approx(modeled.step_us_attention).epsilon(1e-6));
  CHECK(to_json(same)["selection"]["source"] == "given (measured)");
  CHECK(to_json(same)["selection"]["staging_hit_share"].is_null());  // the model's own, unused
  // NVMe reads where no block is on NVMe cannot be: refused, naming the field.
  SimInputs all_gpu = inputs("h200,ddr5-512g,nvme-gen5", 131072);
  all_gpu.selection_shares = MeasuredSelection{0.5, 0.1};
  const Result<PlanReport> refused = simulate(all_gpu);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().message().find("selection_shares nvme=0.1") != std::string::npos);
  // More NVMe reads per step, fewer GPU hits: a slower step, more drive time.
  in.selection_shares = MeasuredSelection{0.1, 0.4};
  const PlanReport worse = run(in);
  CHECK(worse.step_us_attention > modeled.step_us_attention);
  CHECK(worse.traffic.nvme_read_bytes > modeled.traffic.nvme_read_bytes);
  bool said = false;
  for (const std::string& s : worse.assumptions) said = said || s.find("GIVEN (measured)") != std::string::npos;
  CHECK(said);
}

TEST_CASE("invalid inputs are named") {
  struct Case {
    const char* field;
    void (*edit)(SimInputs&);
  };
  const Case cases[] = {
      {"context_tokens", [](SimInputs& in) { in.context_tokens = 0; }},
      {"batch", [](SimInputs& in) { in.batch = 0; }},
      {"selection_overlap", [](SimInputs& in) { in.selection_overlap = 1.5; }},
      {"selection_shares", [](SimInputs& in) { in.selection_shares = MeasuredSelection{0.8, 0.3}; }},
      {"selection_shares", [](SimInputs& in) { in.selection_shares = MeasuredSelection{-0.1, 0.3}; }},
      {"gpu_budget_bytes", [](SimInputs& in) { in.gpu_budget_bytes = 20 * kGiB; }},
      {"host_budget_bytes", [](SimInputs& in) { in.host_budget_bytes = 1024 * kGiB; }},
      {"chunk_tokens", [](SimInputs& in) { in.policy.chunk_tokens = 48; }},
      {"weights_bytes", [](SimInputs& in) { in.model.weights_bytes = 0; }},
      {"hbm_read_gbps", [](SimInputs& in) { in.machine.gpu.hbm_read_gbps = 0; }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.field);
    SimInputs in = inputs();
    c.edit(in);
    const Result<PlanReport> r = simulate(in);
    REQUIRE(!r.ok());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK(r.status().message().find(c.field) != std::string::npos);
  }
}

TEST_CASE("given budgets and overlap are used and stated") {
  SimInputs in = inputs();
  in.gpu_budget_bytes = 2 * kGiB;
  in.host_budget_bytes = 32 * kGiB;
  in.selection_overlap = 0.9;
  const PlanReport r = run(in);
  CHECK(r.cap.placement.gpu_budget_bytes == 2 * kGiB);
  CHECK(r.cap.placement.host.bytes == 32 * kGiB);
  CHECK(r.selection.overlap == 0.9);
  bool stated = false;
  for (const std::string& a : r.assumptions) stated |= a.find("o = 0.9 (given)") != std::string::npos;
  CHECK(stated);
  // More overlap means fewer new blocks: never slower.
  in.selection_overlap = 0.3;
  CHECK(run(in).decode_tokens_per_s_attention <= r.decode_tokens_per_s_attention);
}
