// Machine profiles: what the memory-tier simulator (`kvtier plan`, DESIGN.md
// section 9) knows about a machine: its GPU, the host<->GPU link, the host's
// CPU and RAM, and the NVMe drive that holds spilled KV blocks.
//
// JSON schema (docs/machine-profile.md has the full text and an example). A
// whole machine is one object with four parts; a file may also hold any
// subset of the parts, told apart by which top-level keys it has. Unknown
// keys are rejected so that a misspelt field never silently keeps a default.
//
//   { "name": string (optional),
//     "gpu":  { "name", "source", "memory_bytes": uint, "hbm_read_gbps": number,
//               "bf16_tflops": number, "sm_count": uint, "cpu_standin": bool (optional) },
//     "link": { "name", "source", "duplex_factor": number in (0, 1],
//               "h2d": [ {"bytes": uint, "gbps": number}, ... ],
//               "d2h": [ {"bytes": uint, "gbps": number}, ... ] },
//     "host": { "name", "source", "memory_bytes": uint, "read_gbps": number,
//               "cores": uint, "score_gbps": number, "attend_gbps": number,
//               "prepare_us_per_list": number >= 0, "plan_us_per_block": number >= 0,
//               "step_overhead_us": number >= 0, "attend_call_us": number >= 0,
//               "prefill_stage_gbps": number, "prefill_query_gbps": number },
//     "nvme": { "name", "source", "capacity_bytes": uint, "latency_us": number,
//               "read":  [ {"request_bytes": uint, "queue_depth": uint, "gbps": number}, ... ],
//               "write": [ same ] } }
//
// "name" and "source" are strings in every part; "source" says where each
// number comes from and which numbers are assumptions. GB/s means 1e9 bytes
// per second. Every size, rate and count must be > 0. A link curve needs at
// least one point; an NVMe table must be a full grid (every request size at
// every queue depth).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/core/status.h"

namespace kvtier::scheduler {

// The four parts a machine is composed of.
enum class MachinePart : uint8_t { kGpu, kLink, kHost, kNvme };

// "gpu", "link", "host", "nvme": the part's JSON key.
std::string_view machine_part_name(MachinePart part);

struct GpuProfile {
  std::string name;
  std::string source;
  uint64_t memory_bytes = 0;   // device memory the driver reports in total
  double hbm_read_gbps = 0;    // device memory bandwidth, GB/s
  double bf16_tflops = 0;      // dense bf16 tensor-core rate with fp32 accumulate, no sparsity
  uint32_t sm_count = 0;
  // kvtier's CPU stand-in for a GPU (the CPU backend, where no GPU is): its
  // "kernels" run on the host's cores, hbm_read_gbps is the rate at which it
  // attends K/V bytes in decode, bf16_tflops its prefill attention rate (as
  // run, no kernel efficiency applied), memory_bytes the host RAM it takes
  // its slots from, and its work and the link's copies (memcpy) share the
  // cores with the CPU lane. kvtier calibrate --gpu cpu-standin measures it.
  bool cpu_standin = false;
  friend bool operator==(const GpuProfile&, const GpuProfile&) = default;
};

// One measured or modeled point: a single transfer of `bytes` runs at `gbps`.
struct BandwidthPoint {
  uint64_t bytes = 0;
  double gbps = 0;
  friend bool operator==(const BandwidthPoint&, const BandwidthPoint&) = default;
};

// Bandwidth of one transfer by its size; points sorted by bytes, strictly increasing.
struct BandwidthCurve {
  std::vector<BandwidthPoint> points;

  // GB/s for one transfer of `bytes`: linear in log(bytes) between points,
  // the first/last point's rate outside the table.
  double gbps_at(uint64_t bytes) const;
  friend bool operator==(const BandwidthCurve&, const BandwidthCurve&) = default;
};

enum class LinkDirection : uint8_t { kHostToDevice, kDeviceToHost };

// The host<->GPU link (PCIe), with pinned host memory.
struct LinkProfile {
  std::string name;
  std::string source;
  BandwidthCurve h2d;           // host to device
  BandwidthCurve d2h;           // device to host
  double duplex_factor = 1.0;   // each direction's share of its one-way rate while both directions run

  // GB/s of one transfer of `bytes` in `dir`; `both_directions` applies duplex_factor.
  double gbps_at(LinkDirection dir, uint64_t bytes, bool both_directions = false) const;
  friend bool operator==(const LinkProfile&, const LinkProfile&) = default;
};

struct HostProfile {
  std::string name;
  std::string source;
  uint64_t memory_bytes = 0;  // installed RAM
  double read_gbps = 0;       // sustained read bandwidth of all cores together, GB/s
  uint32_t cores = 0;         // physical cores kvtier may use
  double score_gbps = 0;      // summary bytes scored per second by all cores (DESIGN.md section 3)
  double attend_gbps = 0;     // bf16 K/V bytes of host-resident blocks attended per second by all cores
  double topk_gbps = 0;       // fp32 block scores ranked per second by decode's top-k (one task per KV head)
  // The decode executor's own serial host time on this CPU (kvtier calibrate
  // runs the executor to measure it; planner.h CostRates::host_*_us):
  double prepare_us_per_list = 0;  // per (sequence, KV head) and layer step
  double plan_us_per_block = 0;    // per selected block
  double step_overhead_us = 0;     // per layer step
  double attend_call_us = 0;       // per in-step CPU attention call, beyond its bytes at attend_gbps
  // Its prefill's host passes, per query block and layer: K/V bytes staged
  // (append, GPU copies, summaries, home writes started) and q bytes through
  // the query pass with scoring and top-k, per second.
  double prefill_stage_gbps = 0;
  double prefill_query_gbps = 0;
  friend bool operator==(const HostProfile&, const HostProfile&) = default;
};

// Throughput with `queue_depth` requests of `request_bytes` in flight.
struct NvmePoint {
  uint64_t request_bytes = 0;
  uint32_t queue_depth = 0;
  double gbps = 0;
  friend bool operator==(const NvmePoint&, const NvmePoint&) = default;
};

// A full grid of NvmePoints sorted by (request_bytes, queue_depth).
struct NvmeCurve {
  std::vector<NvmePoint> points;

  // GB/s: bilinear in (log request_bytes, log queue_depth), clamped to the grid's edges.
  double gbps_at(uint64_t request_bytes, uint32_t queue_depth) const;
  friend bool operator==(const NvmeCurve&, const NvmeCurve&) = default;
};

// The drive holding the KV spill file, read and written with O_DIRECT through io_uring.
struct NvmeProfile {
  std::string name;
  std::string source;
  uint64_t capacity_bytes = 0;  // space for the KV file
  double latency_us = 0;        // one 4 KiB read at queue depth 1, issue to completion
  NvmeCurve read;
  NvmeCurve write;

  double read_gbps_at(uint64_t request_bytes, uint32_t queue_depth) const {
    return read.gbps_at(request_bytes, queue_depth);
  }
  double write_gbps_at(uint64_t request_bytes, uint32_t queue_depth) const {
    return write.gbps_at(request_bytes, queue_depth);
  }
  friend bool operator==(const NvmeProfile&, const NvmeProfile&) = default;
};

struct MachineProfile {
  std::string name;  // e.g. the composition spec "rtx4090,ddr5-128g,nvme-gen4"
  GpuProfile gpu;
  LinkProfile link;
  HostProfile host;
  NvmeProfile nvme;
  friend bool operator==(const MachineProfile&, const MachineProfile&) = default;
};

// Each checks its part and names the offending field by its path:
// "machine profile gpu.hbm_read_gbps = 0: must be > 0".
Status validate(const GpuProfile& gpu);
Status validate(const LinkProfile& link);
Status validate(const HostProfile& host);
Status validate(const NvmeProfile& nvme);
Status validate(const MachineProfile& machine);

// A whole machine from its JSON object (the schema above); `origin` (a file
// name, "preset x") prefixes every error message. Curves may come in any
// order; they are sorted.
Result<MachineProfile> parse_machine_profile_json(const nlohmann::json& j, std::string_view origin);

// The JSON object of a machine, or of one part (without the part's key).
nlohmann::json to_json(const MachineProfile& machine);
nlohmann::json to_json(const GpuProfile& gpu);
nlohmann::json to_json(const LinkProfile& link);
nlohmann::json to_json(const HostProfile& host);
nlohmann::json to_json(const NvmeProfile& nvme);

// A machine from a comma list of preset names and JSON file paths, e.g.
// "rtx4090,ddr5-128g,nvme-gen4" or "h100-sxm,mybox-host.json,nvme-gen5" or
// "mybox.json". Each of gpu, host and nvme must be given exactly once. A GPU
// preset brings its PCIe link; a link preset or a file with a "link" key
// replaces it. A file may hold a whole machine or any of its parts. A preset
// name wins over a file of the same name (write ./h200 for the file).
Result<MachineProfile> compose_machine(std::string_view spec);

// A whole machine from one JSON file.
Result<MachineProfile> load_machine_profile(const std::filesystem::path& path);

// The preset names of one part, in table order.
std::vector<std::string> preset_names(MachinePart part);

}  // namespace kvtier::scheduler
