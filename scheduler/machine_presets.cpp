// Machine presets for the simulator: GPUs (each with its usual PCIe link),
// links, DDR4/DDR5 hosts and Gen4/Gen5 NVMe drives.
//
// Every number is tagged in its part's source: [spec] from a vendor spec
// sheet or whitepaper, [measured] from a kvtier run committed under
// bench/results/, [assumption] for everything else. Curves are generated from
// a two-parameter model (a fixed per-request cost plus bytes at the peak
// rate) so that the table and its explanation cannot drift apart; `kvtier
// calibrate` replaces them with measurements.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "machine_presets.h"

namespace kvtier::scheduler::detail {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

// Three decimals are plenty for a modeled rate and keep the JSON readable.
double round3(double x) { return std::round(x * 1000.0) / 1000.0; }

// One copy of `bytes` costs `overhead_us` plus bytes at `peak_gbps`
// (bytes / (GB/s) = ns).
BandwidthCurve modeled_copy_curve(double peak_gbps, double overhead_us) {
  BandwidthCurve curve;
  for (uint64_t bytes : {4 * kKiB, 16 * kKiB, 32 * kKiB, 64 * kKiB, 256 * kKiB, kMiB, 4 * kMiB, 32 * kMiB,
                         256 * kMiB}) {
    const double ns = overhead_us * 1e3 + static_cast<double>(bytes) / peak_gbps;
    curve.points.push_back({bytes, round3(static_cast<double>(bytes) / ns)});
  }
  return curve;
}

// `queue_depth` requests in flight, each taking `latency_us` plus its bytes at
// `peak_gbps`; small requests top out below the peak because the drive is
// IOPS-bound there (4 KiB at 80%, 32 KiB at 90% of the sequential rate).
NvmeCurve modeled_nvme_curve(double peak_gbps, double latency_us) {
  NvmeCurve curve;
  for (uint64_t bytes : {4 * kKiB, 32 * kKiB, 128 * kKiB, kMiB}) {
    const double cap = bytes <= 4 * kKiB ? 0.8 : bytes <= 32 * kKiB ? 0.9 : 1.0;
    const double one_gbps = static_cast<double>(bytes) / (latency_us * 1e3 + static_cast<double>(bytes) / peak_gbps);
    for (uint32_t qd : {1u, 4u, 8u, 32u, 64u})
      curve.points.push_back({bytes, qd, round3(std::min(cap * peak_gbps, qd * one_gbps))});
  }
  return curve;
}

constexpr const char* kLinkModel =
    " [assumption] curve = bytes / (overhead + bytes / peak) at 4 KiB..256 MiB, with the per-copy overhead "
    "9.2 us [measured] on the H200 host (bench/results/2026-11-28-storage-h200-host.json: one cudaMemcpyAsync "
    "per 32 KiB block ran at 3.32 GB/s against 52.6 GB/s for 32 MiB copies); d2h assumed equal to h2d; "
    "duplex_factor 0.85 assumed (PCIe is full duplex, but concurrent copies rarely keep both directions at "
    "full rate). Measure with kvtier calibrate.";

LinkProfile pcie_link(const char* name, double peak_gbps, const char* peak_text) {
  LinkProfile link;
  link.name = name;
  link.source = std::string(peak_text) + kLinkModel;
  link.h2d = modeled_copy_curve(peak_gbps, 9.2);
  link.d2h = link.h2d;
  link.duplex_factor = 0.85;
  return link;
}

std::vector<LinkProfile> make_links() {
  return {
      pcie_link("pcie-gen4-x16", 25.0,
                "PCIe 4.0 x16, pinned host memory. [spec] 16 GT/s x 16 lanes = 31.5 GB/s per direction before "
                "protocol overhead; [assumption] peak 25 GB/s, the rate large pinned copies typically reach."),
      pcie_link("pcie-gen5-x16", 52.6,
                "PCIe 5.0 x16, pinned host memory. [spec] 32 GT/s x 16 lanes = 63 GB/s per direction before "
                "protocol overhead; [measured] peak 52.6 GB/s, one 32 MiB pinned copy on the H200 host "
                "(bench/results/2026-11-28-storage-h200-host.json)."),
  };
}

GpuProfile gpu(const char* name, uint64_t memory_mib, double hbm_gbps, double tflops, uint32_t sms,
               std::string source) {
  return GpuProfile{name, std::move(source), memory_mib * kMiB, hbm_gbps, tflops, sms};
}

std::vector<GpuPreset> make_gpus() {
  return {
      {gpu("rtx4090", 24564, 1008, 165.2, 128,
           "NVIDIA GeForce RTX 4090. [spec] NVIDIA Ada Lovelace architecture whitepaper: 24 GB GDDR6X at 1008 GB/s, "
           "128 SMs, 165.2 dense BF16 tensor TFLOPS with FP32 accumulate (GeForce runs FP32 accumulate at half "
           "the FP16-accumulate rate; 330.4 with sparsity). [assumption] memory_bytes = 24564 MiB, the total "
           "nvidia-smi commonly reports for this card. PCIe 4.0 x16."),
       "pcie-gen4-x16"},
      {gpu("rtx5090", 32607, 1792, 209.5, 170,
           "NVIDIA GeForce RTX 5090. [spec] NVIDIA RTX Blackwell GPU architecture whitepaper / product page: 32 GB "
           "GDDR7 at 1792 GB/s, 170 SMs, 209.5 dense BF16 tensor TFLOPS with FP32 accumulate (419 with FP16 "
           "accumulate; 838 with sparsity). [assumption] memory_bytes = 32607 MiB as nvidia-smi commonly "
           "reports it. PCIe 5.0 x16."),
       "pcie-gen5-x16"},
      {gpu("rtx6000ada", 49140, 960, 364.2, 142,
           "NVIDIA RTX 6000 Ada Generation. [spec] NVIDIA RTX 6000 Ada datasheet and Ada whitepaper: 48 GB GDDR6 "
           "(ECC) at 960 GB/s, 142 SMs, 364.2 dense BF16 tensor TFLOPS with FP32 accumulate (728.5 with "
           "sparsity). [assumption] memory_bytes = 49140 MiB as nvidia-smi commonly reports it (ECC on). "
           "PCIe 4.0 x16."),
       "pcie-gen4-x16"},
      {gpu("a100-80g-pcie", 81920, 1935, 312, 108,
           "NVIDIA A100 80GB PCIe. [spec] NVIDIA A100 datasheet: 80 GB HBM2e at 1935 GB/s, 312 dense BF16 tensor "
           "TFLOPS (624 with sparsity); 108 SMs (A100 whitepaper). [assumption] memory_bytes = 81920 MiB as "
           "nvidia-smi reports it. PCIe 4.0 x16."),
       "pcie-gen4-x16"},
      {gpu("h100-pcie", 81559, 2000, 756, 114,
           "NVIDIA H100 PCIe 80GB. [spec] NVIDIA H100 datasheet: 80 GB HBM2e at 2 TB/s, 1513 BF16 tensor TFLOPS "
           "with sparsity = 756 dense; 114 SMs (H100 whitepaper). [assumption] memory_bytes = 81559 MiB as "
           "nvidia-smi reports H100 80GB cards. PCIe 5.0 x16."),
       "pcie-gen5-x16"},
      {gpu("h100-sxm", 81559, 3350, 989, 132,
           "NVIDIA H100 SXM5 80GB. [spec] NVIDIA H100 datasheet: 80 GB HBM3 at 3.35 TB/s, 1979 BF16 tensor "
           "TFLOPS with sparsity = 989 dense; 132 SMs (H100 whitepaper). [assumption] memory_bytes = 81559 MiB "
           "as nvidia-smi reports H100 80GB cards. Host link PCIe 5.0 x16."),
       "pcie-gen5-x16"},
      {gpu("h200", 143771, 4800, 989, 132,
           "NVIDIA H200 SXM 141GB. [spec] NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s, 1979 BF16 tensor TFLOPS "
           "with sparsity = 989 dense; 132 SMs (same GH100 configuration as H100 SXM). [measured] memory_bytes = "
           "143771 MiB, nvidia-smi memory.total on kvtier's H200 device host. Host link PCIe 5.0 x16 "
           "(nvidia-smi: gen 5, width 16)."),
       "pcie-gen5-x16"},
  };
}

// A host with `channels` memory channels of 8 bytes at `mts` MT/s.
struct DdrHost {
  const char* name;
  uint64_t memory_gib;
  const char* ddr;  // "DDR5-4800"
  uint32_t channels;
  uint32_t mts;
  uint32_t cores;
  const char* platform;
};

// Practical reads reach about 75% of channels x 8 B x MT/s. The CPU kernels
// are memory-bound on the measured host (83 GB/s scoring and block attention
// at 104 GB/s read, 16 threads: 0.8 of read, 5.2 GB/s per core), so they are
// modeled as min(0.8 x read, 5.2 GB/s x cores).
// The executor's host time on the H200 host (16 threads, workers kept warm
// through serial phases), as kvtier calibrate --quick measured it in the lease
// of the simulator's validation v4: per layer step with every selected block
// GPU-resident (256K tokens, 2 layers), per in-step CPU attention call beyond
// its bytes (a second run whose small GPU cache leaves selected blocks in host memory), and its
// prefill per query block of 8192 tokens and layer.
constexpr double kPrepareUsPerList = 14.2;
constexpr double kPlanUsPerBlock = 0.527;
constexpr double kStepOverheadUs = 386;
constexpr double kAttendCallUs = 53.7;
constexpr double kPrefillStageGbps = 4.20;
constexpr double kPrefillQueryGbps = 6.42;
// Decode's top-k: 8 KV heads x 16318 fp32 block scores (522 KB) ranked in
// 0.178 ms on the H200 host's Xeon (cpu:topk_1m,
// bench/results/2026-11-28-cpu-h200-host-16threads-scattered.json), with the
// streaming top-k. The chunk-bound top-k that replaced it ran 1.7x faster in
// the cpu suite on the build machine; not yet measured on that host.
constexpr double kTopkGbps = 2.93;
constexpr const char* kExecutorSource =
    "kvtier calibrate --quick on that host, bench/results/2026-11-28-plan-validation-h200-v4/calibrated-profile.json";

HostProfile ddr_host(const DdrHost& h) {
  const double theoretical_gbps = h.channels * 8.0 * h.mts / 1000.0;
  const double read_gbps = round3(0.75 * theoretical_gbps);
  const double cpu_gbps = round3(std::min(0.8 * read_gbps, 5.2 * h.cores));
  HostProfile p;
  p.name = h.name;
  p.memory_bytes = h.memory_gib * kGiB;
  p.read_gbps = read_gbps;
  p.cores = h.cores;
  p.score_gbps = cpu_gbps;
  p.attend_gbps = cpu_gbps;
  p.topk_gbps = kTopkGbps;
  p.prepare_us_per_list = kPrepareUsPerList;
  p.plan_us_per_block = kPlanUsPerBlock;
  p.step_overhead_us = kStepOverheadUs;
  p.attend_call_us = kAttendCallUs;
  p.prefill_stage_gbps = kPrefillStageGbps;
  p.prefill_query_gbps = kPrefillQueryGbps;
  char source[4096];
  std::snprintf(
      source, sizeof source,
      "%s. [assumption] %llu GiB RAM, %u cores, %u channels of %s; [spec] JEDEC peak %u x 8 B x %u MT/s = "
      "%.1f GB/s; [assumption] read_gbps = 75%% of peak, a typical all-core STREAM-read fraction. "
      "score_gbps = attend_gbps = min(0.8 x read_gbps, 5.2 GB/s x cores), scaled from [measured] 83 GB/s "
      "summary scoring and 83 GB/s block attention at 104 GB/s read with 16 threads and AVX-512 bf16 "
      "(bench/results/2026-11-28-cpu-h200-host-16threads-scattered.json); CPUs without AVX-512 bf16 will be "
      "slower. [measured] topk_gbps = 2.93 GB/s: decode's top-k over 1M tokens' block scores (8 KV heads x 16318 "
      "fp32 scores in 0.178 ms, one task per KV head, same file; the streaming top-k, which a faster one has since "
      "replaced). [measured] prepare_us_per_list, plan_us_per_block, step_overhead_us, attend_call_us: the decode "
      "executor's host time on the H200 host's 16-vCPU Xeon, prefill_stage_gbps, prefill_query_gbps: its "
      "prefill's host passes there (%s); a desktop CPU with faster cores will likely spend less. "
      "Measure with kvtier calibrate.",
      h.platform, static_cast<unsigned long long>(h.memory_gib), h.cores, h.channels, h.ddr, h.channels, h.mts,
      theoretical_gbps, kExecutorSource);
  p.source = source;
  return p;
}

std::vector<HostProfile> make_hosts() {
  const DdrHost hosts[] = {
      {"ddr4-64g", 64, "DDR4-3200", 2, 3200, 8, "Desktop DDR4 (e.g. Ryzen 7 5800X class)"},
      {"ddr4-128g", 128, "DDR4-3200", 2, 3200, 16, "Desktop DDR4 with four DIMMs (e.g. Ryzen 9 5950X class)"},
      {"ddr4-256g", 256, "DDR4-3200", 8, 3200, 32,
       "Server/workstation DDR4 (e.g. EPYC 7003 or Threadripper PRO 5000 class)"},
      {"ddr5-64g", 64, "DDR5-5600", 2, 5600, 16, "Desktop DDR5 (e.g. Ryzen 9 7950X class)"},
      {"ddr5-128g", 128, "DDR5-4800", 2, 4800, 16,
       "Desktop DDR5 with four DIMMs, which run slower than two (e.g. Ryzen 9 7950X class)"},
      {"ddr5-256g", 256, "DDR5-4800", 8, 4800, 24,
       "Workstation DDR5 (e.g. Xeon W-3400 or Threadripper PRO 7000 class)"},
      {"ddr5-512g", 512, "DDR5-4800", 12, 4800, 64, "Server DDR5 (e.g. EPYC 9004 class, one socket)"},
  };
  std::vector<HostProfile> out;
  for (const DdrHost& h : hosts) out.push_back(ddr_host(h));
  return out;
}

constexpr const char* kNvmeModel =
    " [assumption] tables = min(cap, queue_depth x request_bytes / (latency + request_bytes / peak)) at "
    "4 KiB..1 MiB and queue depth 1..64, cap = 80% of peak at 4 KiB and 90% at 32 KiB (IOPS-bound); "
    "writes assume 20 us per request (the drive's write cache) and hold only until its SLC cache fills, "
    "after which TLC drives sustain much less. capacity_bytes assumes a 2 TB drive. Measure with kvtier "
    "calibrate.";

NvmeProfile nvme(const char* name, double read_peak, double write_peak, double latency_us, const char* text) {
  NvmeProfile p;
  p.name = name;
  p.capacity_bytes = 2'000'000'000'000ULL;
  p.latency_us = latency_us;
  p.read = modeled_nvme_curve(read_peak, latency_us);
  p.write = modeled_nvme_curve(write_peak, 20.0);
  p.source = std::string(text) + kNvmeModel;
  return p;
}

std::vector<NvmeProfile> make_nvmes() {
  return {
      nvme("nvme-gen4", 7.0, 6.5, 60.0,
           "PCIe 4.0 x4 NVMe SSD (Samsung 990 Pro / WD SN850X class). [spec] sequential read up to 7.0-7.45 GB/s, "
           "write up to 6.6-6.9 GB/s, 4 KiB QD1 random read about 22K IOPS (~45 us); [assumption] peak read "
           "7.0 GB/s, write 6.5 GB/s, latency 60 us including the kernel's io_uring/O_DIRECT path."),
      nvme("nvme-gen5", 13.0, 11.5, 50.0,
           "PCIe 5.0 x4 NVMe SSD (Crucial T705 / Samsung 9100 Pro class). [spec] sequential read up to "
           "14.5-14.8 GB/s, write up to 12.7-13.4 GB/s; [assumption] peak read 13 GB/s and write 11.5 GB/s "
           "(about 90% of the spec), latency 50 us."),
  };
}

}  // namespace

std::span<const GpuPreset> gpu_presets() {
  static const std::vector<GpuPreset> presets = make_gpus();
  return presets;
}

std::span<const LinkProfile> link_presets() {
  static const std::vector<LinkProfile> presets = make_links();
  return presets;
}

std::span<const HostProfile> host_presets() {
  static const std::vector<HostProfile> presets = make_hosts();
  return presets;
}

std::span<const NvmeProfile> nvme_presets() {
  static const std::vector<NvmeProfile> presets = make_nvmes();
  return presets;
}

}  // namespace kvtier::scheduler::detail
