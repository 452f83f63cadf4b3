// CRC32C (Castagnoli), the checksum of every block on the NVMe tier: the SSE4.2
// crc32 instruction where the CPU has it (chosen at run time), a table otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvtier::storage {

// CRC32C of [data, data + bytes), continuing from `crc` (0 to start).
uint32_t crc32c(const void* data, size_t bytes, uint32_t crc = 0);
// The portable table version, for tests and CPUs without SSE4.2.
uint32_t crc32c_portable(const void* data, size_t bytes, uint32_t crc = 0);

}  // namespace kvtier::storage
