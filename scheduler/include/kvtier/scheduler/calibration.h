// `kvtier calibrate`: a machine profile (machine_profile.h) measured on this
// machine. The benchmarks run as kvtier-bench suites, each printing one JSON
// report {bench, machine, config, results: [{name, value, unit, ...}]}; this
// maps their results to profile fields, a pure function so that the mapping is
// tested on hand-written reports. docs/machine-profile.md lists the rules;
// calibration_rules() is the same table in code.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/core/status.h"
#include "kvtier/scheduler/machine.h"
#include "kvtier/scheduler/machine_profile.h"

namespace kvtier::scheduler {

// The reports of `kvtier-bench <suite> --json`, parsed.
struct BenchReports {
  nlohmann::json memory;   // suite memory
  nlohmann::json storage;  // suite storage, with its h2d/d2h link figures on a GPU host
  nlohmann::json cpu;      // suite cpu
  nlohmann::json gpu;      // suite gpu; null when it did not run (no GPU, or a GPU preset replaces it)
  nlohmann::json executor;  // suite executor: the decode executor's host time (host.*_us)
};

struct CalibrationInputs {
  // How and when the reports were made, e.g. "kvtier calibrate 2026-11-28
  // --quick"; opens every part's source ("measured by <origin>: ...").
  std::string origin;
  uint64_t nvme_capacity_bytes = 0;  // free space on the storage suite's directory before it ran
  // A GPU preset name (preset_names(MachinePart::kGpu)): the gpu and link parts
  // come from it instead of the gpu report and the link figures. Empty:
  // measure them; then the machine must have a GPU.
  // kCpuStandinName instead: kvtier's CPU stand-in for a GPU, measured here
  // from the memory, cpu and executor suites (GpuProfile::cpu_standin).
  std::string gpu_preset;
};

// The --gpu value that calibrates the CPU stand-in instead of a GPU.
inline constexpr std::string_view kCpuStandinName = "cpu-standin";

// One profile field and the bench result it comes from.
struct CalibrationRule {
  std::string field;   // "host.read_gbps", "nvme.read[32 KiB, QD8].gbps"
  std::string suite;   // "memory", "storage", "cpu", "gpu", "executor"
  std::string result;  // "read_gbps_all_threads"
  std::string unit;    // the unit the report must give: "GB/s", "TFLOP/s"
};

// Every measured field (those taken from facts or the directory are not listed).
std::vector<CalibrationRule> calibration_rules();

// The profile the reports measure. The host part comes from facts (cores,
// RAM) and the memory, cpu and executor reports; the nvme part from the storage report
// and inputs.nvme_capacity_bytes; the gpu part from facts (name, memory,
// SMs) and the gpu report, the link part from the storage report's link
// figures; or both from inputs.gpu_preset. Errors name the suite and the
// result that is missing or malformed, or say that no GPU was measured and
// no preset given. The profile passes validate().
Result<MachineProfile> profile_from_reports(const MachineFacts& facts, const BenchReports& reports,
                                            const CalibrationInputs& inputs);

}  // namespace kvtier::scheduler
