#include <doctest/doctest.h>

#include <sched.h>
#include <unistd.h>

#include <set>

#include "kvtier/cpu/topology.h"

namespace {

// CPUs this process may run on: the cgroup cpuset (docker --cpuset-cpus)
// and any affinity mask (taskset) narrow it.
long allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
  return CPU_COUNT(&set);
}

}  // namespace

TEST_CASE("load_topology finds cores, PUs and NUMA nodes") {
  const kvtier::Result<kvtier::cpu::Topology> loaded = kvtier::cpu::load_topology();
  REQUIRE_MESSAGE(loaded.ok(), loaded.status().to_string());
  const kvtier::cpu::Topology& t = *loaded;
  MESSAGE(t.packages, " packages, ", t.cores, " cores, ", t.pus, " PUs, ",
          t.numa_nodes.size(), " NUMA nodes, ", t.memory_bytes, " bytes");
  CHECK(t.packages >= 1);
  CHECK(t.cores >= 1);
  CHECK(t.pus >= t.cores);
  // sysconf(_SC_NPROCESSORS_ONLN) is the kernel's online count, and a CFS
  // quota (docker --cpus) hides nothing from it or from hwloc, so the two
  // agree there. std::thread::hardware_concurrency() is not used: it may
  // return 0 and, depending on the glibc release, follows either the online
  // count or the affinity mask. A cgroup cpuset is the one container setting
  // hwloc honours (it drops the disallowed PUs), and the affinity mask then
  // shows the same narrower set, so that count is accepted too.
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  CHECK((t.pus == online || t.pus == allowed_cpus()));
  // Every PU sits in exactly one NUMA node.
  REQUIRE(!t.numa_nodes.empty());
  std::set<uint32_t> numa_pus;
  size_t listed = 0;
  for (const kvtier::cpu::NumaNode& node : t.numa_nodes) {
    numa_pus.insert(node.cpus.begin(), node.cpus.end());
    listed += node.cpus.size();
  }
  CHECK(numa_pus.size() == t.pus);
  CHECK(listed == t.pus);
}

TEST_CASE("load_topology reports the machine's memory") {
  const kvtier::Result<kvtier::cpu::Topology> loaded = kvtier::cpu::load_topology();
  REQUIRE_MESSAGE(loaded.ok(), loaded.status().to_string());
  const double kernel_bytes =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
  const double bytes = static_cast<double>(loaded->memory_bytes);
  CAPTURE(bytes);
  CAPTURE(kernel_bytes);
  CHECK(bytes >= 0.9 * kernel_bytes);
  CHECK(bytes <= 1.1 * kernel_bytes);
}

TEST_CASE("load_topology lists caches in ascending level with real sizes") {
  const kvtier::Result<kvtier::cpu::Topology> loaded = kvtier::cpu::load_topology();
  REQUIRE_MESSAGE(loaded.ok(), loaded.status().to_string());
  const std::vector<kvtier::cpu::CacheLevel>& caches = loaded->caches;
  if (caches.empty()) MESSAGE("hwloc found no caches on this machine");
  for (size_t i = 0; i < caches.size(); ++i) {
    CAPTURE(i);
    CHECK(caches[i].size_bytes > 0);
    CHECK(caches[i].instances > 0);
    CHECK(caches[i].level >= 1);
    CHECK(caches[i].level <= 3);
    if (i == 0) continue;
    CHECK(caches[i].level > caches[i - 1].level);
    // A larger level is never smaller per instance on any CPU kvtier targets;
    // a smaller one here means the levels were mixed up.
    CHECK(caches[i].size_bytes >= caches[i - 1].size_bytes);
  }
}

TEST_CASE("a PCI device hwloc does not see has no nearest NUMA node") {
  const auto node = kvtier::cpu::numa_node_of_pci("ffff:ff:1f.7");
  REQUIRE(node.ok());
  CHECK_FALSE(node->has_value());
}
