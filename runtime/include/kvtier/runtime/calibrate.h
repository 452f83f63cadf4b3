// Calibration as the runtime offers it to the CLI (`kvtier calibrate`): a
// machine profile from this machine's benchmark reports
// (scheduler/calibration.h has the rules).
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/core/status.h"
#include "kvtier/runtime/machine_info.h"
#include "kvtier/scheduler/calibration.h"
#include "kvtier/scheduler/machine_profile.h"

namespace kvtier::runtime {

using scheduler::BenchReports;
using scheduler::kCpuStandinName;
using scheduler::CalibrationInputs;
using scheduler::MachineProfile;

// The validated profile the reports measure; errors name the suite and result.
Result<MachineProfile> calibrated_profile(const MachineFacts& facts, const BenchReports& reports,
                                          const CalibrationInputs& inputs);

// The profile as a machine-profile JSON file holds it (docs/machine-profile.md).
nlohmann::json profile_json(const MachineProfile& profile);

// The names `--gpu` accepts: the simulator's GPU presets.
std::vector<std::string> gpu_preset_names();

}  // namespace kvtier::runtime
