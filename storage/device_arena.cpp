#include "kvtier/storage/device_arena.h"

#include <limits>
#include <string>

#include "kvtier/core/sizes.h"

namespace kvtier::storage {

Result<std::unique_ptr<DeviceArena>> DeviceArena::create(ComputeBackend& backend, uint64_t budget_bytes,
                                                         uint64_t slot_bytes) {
  if (slot_bytes == 0 || slot_bytes % 4096 != 0) {
    return invalid_argument("device arena: slot_bytes=" + std::to_string(slot_bytes) +
                            " must be a non-zero multiple of 4 KiB (the block size rounded up)");
  }
  if (budget_bytes < slot_bytes) {
    return invalid_argument("device arena: gpu_bytes=" + format_bytes(budget_bytes) + " is smaller than one " +
                            format_bytes(slot_bytes) + " block slot; give the gpu tier at least " +
                            format_bytes(slot_bytes));
  }
  const uint64_t slots = budget_bytes / slot_bytes;
  if (slots > std::numeric_limits<uint32_t>::max()) {
    return invalid_argument("device arena: gpu_bytes=" + format_bytes(budget_bytes) + " makes " +
                            std::to_string(slots) + " slots, more than 2^32-1; use larger blocks or a smaller budget");
  }
  Result<DeviceMemory> memory = backend.allocate_device(slots * slot_bytes);
  if (!memory.ok()) {
    return memory.status().with_context("device arena of " + std::to_string(slots) + " slots of " +
                                        format_bytes(slot_bytes) + " on " + std::string(backend.name()));
  }
  return std::unique_ptr<DeviceArena>(
      new DeviceArena(std::move(memory).value(), slot_bytes, static_cast<uint32_t>(slots)));
}

DeviceArena::DeviceArena(DeviceMemory memory, uint64_t slot_bytes, uint32_t slots)
    : memory_(std::move(memory)), slot_bytes_(slot_bytes), slots_(slots) {}

std::byte* DeviceArena::slot_data(uint32_t slot) const {
  KVT_ASSERT(slot < capacity(), "device slot ", slot, " is out of range (capacity ", capacity(), ")");
  return memory_.data() + uint64_t{slot} * slot_bytes_;
}

}  // namespace kvtier::storage
