#include "kvtier/runtime/calibrate.h"

namespace kvtier::runtime {

Result<MachineProfile> calibrated_profile(const MachineFacts& facts, const BenchReports& reports,
                                          const CalibrationInputs& inputs) {
  return scheduler::profile_from_reports(facts, reports, inputs);
}

nlohmann::json profile_json(const MachineProfile& profile) { return scheduler::to_json(profile); }

std::vector<std::string> gpu_preset_names() { return scheduler::preset_names(scheduler::MachinePart::kGpu); }

}  // namespace kvtier::runtime
