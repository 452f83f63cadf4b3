#include "kvtier/scheduler/machine.h"

#include <unistd.h>

#include <sstream>

#include "kvtier/core/sizes.h"
#include "kvtier/cpu/versions.h"

namespace kvtier::scheduler {
namespace {

uint64_t sysconf_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
}

nlohmann::json cpu_json(const MachineFacts& f) {
  nlohmann::json j = {
      {"vendor", f.cpu.vendor},
      {"model", f.cpu.model_name},
      {"isa",
       {{"avx2", f.cpu.avx2},
        {"fma", f.cpu.fma},
        {"avx512f", f.cpu.avx512f},
        {"avx512bw", f.cpu.avx512bw},
        {"avx512vl", f.cpu.avx512vl},
        {"avx512_bf16", f.cpu.avx512_bf16},
        {"avx512_fp16", f.cpu.avx512_fp16},
        {"amx_bf16", f.cpu.amx_bf16}}},
      {"best_isa", cpu::best_isa(f.cpu)},
  };
  if (!f.topology) {
    j["topology_error"] = f.topology_error;
    return j;
  }
  const cpu::Topology& t = *f.topology;
  j["packages"] = t.packages;
  j["cores"] = t.cores;
  j["threads"] = t.pus;
  j["numa_nodes"] = nlohmann::json::array();
  for (const cpu::NumaNode& n : t.numa_nodes)
    j["numa_nodes"].push_back({{"index", n.os_index}, {"memory_bytes", n.memory_bytes}, {"cpus", n.cpus}});
  j["caches"] = nlohmann::json::array();
  for (const cpu::CacheLevel& c : t.caches)
    j["caches"].push_back({{"level", c.level}, {"size_bytes", c.size_bytes}, {"instances", c.instances}});
  return j;
}

nlohmann::json gpu_json(const gpu::GpuDevice& g, std::optional<uint32_t> numa_node) {
  auto known = [](int v) { return v < 0 ? nlohmann::json(nullptr) : nlohmann::json(v); };
  return {{"index", g.index},
          {"name", g.name},
          {"memory_bytes", g.memory_bytes},
          {"sm_count", g.sm_count},
          {"compute_capability", std::to_string(g.cc_major) + "." + std::to_string(g.cc_minor)},
          {"pci_bus_id", g.pci_bus_id},
          {"numa_node", numa_node ? nlohmann::json(*numa_node) : nlohmann::json(nullptr)},
          {"pcie",
           {{"gen", known(g.pcie_gen_current)},
            {"gen_max", known(g.pcie_gen_max)},
            {"width", known(g.pcie_width_current)},
            {"width_max", known(g.pcie_width_max)}}}};
}

}  // namespace

MachineFacts probe_machine(const std::string& dir) {
  MachineFacts f;
  f.cpu = cpu::cpu_features();
  if (Result<cpu::Topology> t = cpu::load_topology(); t.ok()) {
    f.topology = std::move(t).value();
    f.memory_bytes = f.topology->memory_bytes;
  } else {
    f.topology_error = t.status().to_string();
  }
  if (f.memory_bytes == 0) f.memory_bytes = sysconf_memory_bytes();
  f.cuda_built = gpu::built_with_cuda();
  if (auto gpus = gpu::list_gpus(); gpus.ok()) {
    f.gpus = std::move(gpus).value();
    if (f.gpus.empty()) f.gpu_error = "the CUDA driver reports no devices";
    for (const gpu::GpuDevice& g : f.gpus) {
      const auto node = cpu::numa_node_of_pci(g.pci_bus_id);
      f.gpu_numa_nodes.push_back(node.ok() ? *node : std::nullopt);
    }
  } else {
    f.gpu_error = gpus.status().message();
  }
  f.io = storage::probe_io(dir);
  f.onednn_version = cpu::onednn_version();
  f.onetbb_version = cpu::onetbb_version();
  f.hwloc_version = cpu::hwloc_version();
  f.cuda_runtime_version = gpu::cuda_runtime_version();
  f.cuda_driver_version = gpu::cuda_driver_version();
  return f;
}

nlohmann::json to_json(const MachineFacts& f) {
  nlohmann::json gpus = nlohmann::json::array();
  for (size_t i = 0; i < f.gpus.size(); ++i) gpus.push_back(gpu_json(f.gpus[i], f.gpu_numa_nodes[i]));
  auto or_null = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
  return {
      {"cpu", cpu_json(f)},
      {"memory_bytes", f.memory_bytes},
      {"gpus", gpus},
      {"cuda", {{"built", f.cuda_built}, {"error", or_null(f.gpu_error)}}},
      {"io_uring",
       {{"available", f.io.io_uring},
        {"o_direct", f.io.o_direct},
        {"dir", f.io.dir},
        {"error", f.io.error ? nlohmann::json(*f.io.error) : nlohmann::json(nullptr)}}},
      {"versions",
       {{"kvtier", KVTIER_VERSION},
        {"onednn", f.onednn_version},
        {"onetbb", f.onetbb_version},
        {"hwloc", f.hwloc_version},
        {"cuda_runtime", or_null(f.cuda_runtime_version)},
        {"cuda_driver", or_null(f.cuda_driver_version)}}},
  };
}

std::string to_text(const MachineFacts& f) {
  std::ostringstream os;
  os << "cpu      " << f.cpu.model_name << " (best kernels: " << cpu::best_isa(f.cpu) << ")\n";
  if (f.topology)
    os << "         " << f.topology->packages << " package(s), " << f.topology->cores << " cores, "
       << f.topology->pus << " threads, " << f.topology->numa_nodes.size() << " NUMA node(s)\n";
  else
    os << "         topology unknown: " << f.topology_error << "\n";
  os << "memory   " << format_bytes(f.memory_bytes) << "\n";
  if (f.gpus.empty()) os << "gpu      none (" << f.gpu_error << ")\n";
  for (const gpu::GpuDevice& g : f.gpus)
    os << "gpu " << g.index << "    " << g.name << ", " << format_bytes(g.memory_bytes) << ", " << g.sm_count
       << " SMs, sm_" << g.cc_major << g.cc_minor << ", PCIe gen " << g.pcie_gen_max << " x" << g.pcie_width_max
       << "\n";
  os << "io_uring " << (f.io.io_uring ? "works" : "unavailable") << ", O_DIRECT "
     << (f.io.o_direct ? "accepted" : "refused") << " in " << f.io.dir;
  if (f.io.error) os << " (" << *f.io.error << ")";
  os << "\nversions oneDNN " << f.onednn_version << ", oneTBB " << f.onetbb_version << ", hwloc " << f.hwloc_version;
  if (!f.cuda_runtime_version.empty()) os << ", CUDA runtime " << f.cuda_runtime_version;
  if (!f.cuda_driver_version.empty()) os << ", driver " << f.cuda_driver_version;
  os << "\n";
  return os.str();
}

}  // namespace kvtier::scheduler
