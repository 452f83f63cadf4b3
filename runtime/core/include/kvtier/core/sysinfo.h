// Facts about this machine that every module may need, read from the kernel.
#pragma once

#include <cstdint>

namespace kvtier {

// MemAvailable from /proc/meminfo in bytes: what can be allocated without
// swapping. 0 when it cannot be read.
uint64_t mem_available_bytes();

}  // namespace kvtier
