// Versions of the CPU-side libraries as loaded at run time.
#pragma once

#include <string>

namespace kvtier::cpu {

std::string onednn_version();  // "2.6.3" (major.minor.patch) from dnnl_version()
std::string onetbb_version();  // "2021.8" from TBB_runtime_version()
// "2.9.0": the library version hwloc records in a loaded topology. Falls back
// to hwloc_get_api_version() decoded, as "2.8.0 (api)": the API version only
// moves when a release changes the API, so it can trail the library (2.9.x
// reports 2.8.0).
std::string hwloc_version();

}  // namespace kvtier::cpu
