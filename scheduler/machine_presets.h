// The preset table behind compose_machine(); private to scheduler/.
#pragma once

#include <span>
#include <string_view>

#include "kvtier/scheduler/machine_profile.h"

namespace kvtier::scheduler::detail {

// A GPU preset brings the PCIe link it is normally installed with.
struct GpuPreset {
  GpuProfile gpu;
  std::string_view link;  // name of a link preset
};

std::span<const GpuPreset> gpu_presets();
std::span<const LinkProfile> link_presets();
std::span<const HostProfile> host_presets();
std::span<const NvmeProfile> nvme_presets();

}  // namespace kvtier::scheduler::detail
