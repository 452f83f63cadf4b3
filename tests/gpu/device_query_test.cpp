#include <doctest/doctest.h>

#include <cctype>
#include <string>

#include "kvtier/gpu/device_query.h"
#include "skip.h"

namespace {

// "0000:1a:00.0": four, two and two lowercase hex digits, then function 0.
bool is_pci_bus_id(const std::string& id) {
  if (id.size() != 12 || id[4] != ':' || id[7] != ':' || id[10] != '.' || id[11] != '0') return false;
  for (size_t i : {0, 1, 2, 3, 5, 6, 8, 9}) {
    const char c = id[i];
    if (!std::isxdigit(static_cast<unsigned char>(c)) || std::isupper(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  return true;
}

}  // namespace

TEST_CASE("list_gpus describes every CUDA device") {
  const auto gpus = kvtier::gpu::list_gpus();
  kvtier::test::require(gpus.ok() && !gpus->empty(),
                        "no CUDA GPU: " + (gpus.ok() ? std::string("the device list is empty")
                                                     : gpus.status().to_string()));
  CHECK(kvtier::gpu::built_with_cuda());
  CHECK(!kvtier::gpu::cuda_runtime_version().empty());
  CHECK(!kvtier::gpu::cuda_driver_version().empty());
  for (const kvtier::gpu::GpuDevice& d : *gpus) {
    CAPTURE(d.index);
    CAPTURE(d.pci_bus_id);
    MESSAGE(d.index, ": ", d.name, ", ", d.memory_bytes, " bytes, ", d.sm_count, " SMs, sm_",
            d.cc_major, d.cc_minor, ", ", d.pci_bus_id, ", PCIe gen ", d.pcie_gen_current, "/",
            d.pcie_gen_max, " x", d.pcie_width_current, "/", d.pcie_width_max);
    CHECK(!d.name.empty());
    CHECK(d.memory_bytes > (uint64_t{1} << 30));
    CHECK(d.sm_count > 0);
    CHECK(d.cc_major >= 5);
    CHECK(is_pci_bus_id(d.pci_bus_id));
    // A link is either unknown (-1) or a real generation and width.
    CHECK((d.pcie_gen_max == -1 || (d.pcie_gen_max >= 1 && d.pcie_gen_max <= 6)));
    if (d.pcie_gen_max > 0) CHECK(d.pcie_gen_current <= d.pcie_gen_max);
    CHECK((d.pcie_width_max == -1 || d.pcie_width_max >= 1));
    if (d.pcie_width_max > 0) CHECK(d.pcie_width_current <= d.pcie_width_max);
  }
}
