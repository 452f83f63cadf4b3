#include "kvtier/core/sysinfo.h"

#include <fstream>
#include <sstream>
#include <string>

namespace kvtier {

uint64_t mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  // Line by line: some lines (HugePages_Total) have no unit column.
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    uint64_t kib = 0;
    if (fields >> key >> kib && key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

}  // namespace kvtier
