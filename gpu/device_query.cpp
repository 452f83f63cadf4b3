// CUDA build of the device query: the CUDA runtime for the device list, and
// NVML (loaded at run time) or sysfs for the PCIe link.
#include "kvtier/gpu/device_query.h"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

namespace kvtier::gpu {
namespace {

// NVML is part of the driver, not the toolkit, and no nvml.h is installed:
// these are the few entry points used, with nvmlDevice_t as an opaque
// pointer and nvmlReturn_t as int (0 is NVML_SUCCESS).
using NvmlInitFn = int (*)();
using NvmlShutdownFn = int (*)();
using NvmlHandleByBusIdFn = int (*)(const char*, void**);
using NvmlDeviceUintFn = int (*)(void*, unsigned*);

// The NVML library, loaded and initialised for the lifetime of the object.
class Nvml {
 public:
  Nvml() { open(); }
  ~Nvml() {
    if (initialized_) shutdown_();
    if (lib_ != nullptr) dlclose(lib_);
  }
  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

  // Fills the PCIe fields NVML knows for the device at bus_id; none when NVML
  // is missing (no driver) or would not start.
  void fill_link(const std::string& bus_id, GpuDevice& d) const;

 private:
  void open();
  template <class Fn>
  Fn symbol(const char* name) const {
    return reinterpret_cast<Fn>(dlsym(lib_, name));
  }

  void* lib_ = nullptr;
  bool initialized_ = false;
  NvmlShutdownFn shutdown_ = nullptr;
  NvmlHandleByBusIdFn handle_by_bus_id_ = nullptr;
  NvmlDeviceUintFn gen_current_ = nullptr, gen_max_ = nullptr;
  NvmlDeviceUintFn width_current_ = nullptr, width_max_ = nullptr;
};

void Nvml::open() {
  lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib_ == nullptr) return;
  const auto init = symbol<NvmlInitFn>("nvmlInit_v2");
  shutdown_ = symbol<NvmlShutdownFn>("nvmlShutdown");
  handle_by_bus_id_ = symbol<NvmlHandleByBusIdFn>("nvmlDeviceGetHandleByPciBusId_v2");
  gen_current_ = symbol<NvmlDeviceUintFn>("nvmlDeviceGetCurrPcieLinkGeneration");
  gen_max_ = symbol<NvmlDeviceUintFn>("nvmlDeviceGetMaxPcieLinkGeneration");
  width_current_ = symbol<NvmlDeviceUintFn>("nvmlDeviceGetCurrPcieLinkWidth");
  width_max_ = symbol<NvmlDeviceUintFn>("nvmlDeviceGetMaxPcieLinkWidth");
  const bool complete = init && shutdown_ && handle_by_bus_id_ && gen_current_ && gen_max_ &&
                        width_current_ && width_max_;
  initialized_ = complete && init() == 0;
}

// Leaves the field at -1 when NVML cannot answer for this device.
void query_uint(NvmlDeviceUintFn fn, void* device, int& field) {
  unsigned value = 0;
  if (fn(device, &value) == 0) field = static_cast<int>(value);
}

void Nvml::fill_link(const std::string& bus_id, GpuDevice& d) const {
  void* device = nullptr;
  if (!initialized_ || handle_by_bus_id_(bus_id.c_str(), &device) != 0) return;
  query_uint(gen_current_, device, d.pcie_gen_current);
  query_uint(gen_max_, device, d.pcie_gen_max);
  query_uint(width_current_, device, d.pcie_width_current);
  query_uint(width_max_, device, d.pcie_width_max);
}

// The first line of a sysfs attribute, or "" when it cannot be read.
std::string read_sysfs(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// "16.0 GT/s PCIe" (older kernels omit " PCIe") -> 4; -1 when unrecognised.
// Each generation's rate is listed, since the rate does not follow one rule.
int pcie_gen_from_speed(const std::string& text) {
  const double gts = std::strtod(text.c_str(), nullptr);
  constexpr double kRates[] = {2.5, 5.0, 8.0, 16.0, 32.0, 64.0};
  for (int i = 0; i < 6; ++i) {
    if (gts > kRates[i] * 0.9 && gts < kRates[i] * 1.1) return i + 1;
  }
  return -1;
}

int pcie_width_from_text(const std::string& text) {
  const long width = std::strtol(text.c_str(), nullptr, 10);
  return width > 0 && width <= 32 ? static_cast<int>(width) : -1;
}

// Fills whatever NVML left unknown from the kernel's view of the link.
void fill_link_from_sysfs(GpuDevice& d) {
  const std::string dir = "/sys/bus/pci/devices/" + d.pci_bus_id + "/";
  const auto gen = [&](int& field, const char* file) {
    if (field < 0) field = pcie_gen_from_speed(read_sysfs(dir + file));
  };
  const auto width = [&](int& field, const char* file) {
    if (field < 0) field = pcie_width_from_text(read_sysfs(dir + file));
  };
  gen(d.pcie_gen_current, "current_link_speed");
  gen(d.pcie_gen_max, "max_link_speed");
  width(d.pcie_width_current, "current_link_width");
  width(d.pcie_width_max, "max_link_width");
}

std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// "major.minor" from CUDA's 1000 * major + 10 * minor encoding.
std::string cuda_version_text(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

Result<GpuDevice> query_device(int index) {
  cudaDeviceProp prop{};
  const cudaError_t err = cudaGetDeviceProperties(&prop, index);
  if (err != cudaSuccess) {
    return internal_error("cudaGetDeviceProperties(" + std::to_string(index) +
                          ") failed: " + cuda_error_text(err));
  }
  GpuDevice d;
  d.index = index;
  d.name = prop.name;
  d.memory_bytes = prop.totalGlobalMem;
  d.sm_count = static_cast<uint32_t>(prop.multiProcessorCount);
  d.cc_major = prop.major;
  d.cc_minor = prop.minor;
  // Lowercase hex, as sysfs names the device and NVML accepts it.
  char bus_id[32];
  std::snprintf(bus_id, sizeof bus_id, "%04x:%02x:%02x.0",
                static_cast<unsigned>(prop.pciDomainID), static_cast<unsigned>(prop.pciBusID),
                static_cast<unsigned>(prop.pciDeviceID));
  d.pci_bus_id = bus_id;
  return d;
}

}  // namespace

bool built_with_cuda() { return true; }

Result<std::vector<GpuDevice>> list_gpus() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // No device, no driver or a driver older than this runtime: the machine
    // cannot run the GPU tier, which is a capability it lacks, not a bug.
    return unavailable("no usable CUDA device: cudaGetDeviceCount failed: " + cuda_error_text(err));
  }
  std::vector<GpuDevice> devices;
  const Nvml nvml;
  for (int i = 0; i < count; ++i) {
    KVT_ASSIGN_OR_RETURN(GpuDevice d, query_device(i));
    nvml.fill_link(d.pci_bus_id, d);
    fill_link_from_sysfs(d);
    devices.push_back(std::move(d));
  }
  return devices;
}

std::string cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess || v <= 0) return {};
  return cuda_version_text(v);
}

std::string cuda_driver_version() {
  // cudaDriverGetVersion reports 0 (and success) when no driver is installed.
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess || v <= 0) return {};
  return cuda_version_text(v);
}

}  // namespace kvtier::gpu
