#include "kvtier/cpu/versions.h"

#include <hwloc.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/tbb/version.h>

#include <cstdio>
#include <memory>

namespace kvtier::cpu {
namespace {

struct TopologyDeleter {
  void operator()(hwloc_topology* t) const { hwloc_topology_destroy(t); }
};

// hwloc adds a "hwlocVersion" info to the root object when it loads a
// topology; it is the only run-time source of the library's own version.
std::string hwloc_library_version() {
  hwloc_topology_t raw = nullptr;
  if (hwloc_topology_init(&raw) != 0) return {};
  const std::unique_ptr<hwloc_topology, TopologyDeleter> topo(raw);
  if (hwloc_topology_load(topo.get()) != 0) return {};
  const char* v = hwloc_obj_get_info_by_name(hwloc_get_root_obj(topo.get()), "hwlocVersion");
  return v != nullptr ? v : "";
}

}  // namespace

std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  if (v == nullptr) return {};
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

std::string onetbb_version() {
  const char* v = TBB_runtime_version();
  return v != nullptr ? v : "";
}

std::string hwloc_version() {
  std::string version = hwloc_library_version();
  if (!version.empty()) return version;
  // The API version is encoded as (major << 16) | (minor << 8) | revision.
  const unsigned api = hwloc_get_api_version();
  char text[32];
  std::snprintf(text, sizeof text, "%u.%u.%u (api)", api >> 16, (api >> 8) & 0xffu, api & 0xffu);
  return text;
}

}  // namespace kvtier::cpu
