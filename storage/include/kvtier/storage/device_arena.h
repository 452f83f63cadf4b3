// DeviceArena: the gpu tier's block slots.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "kvtier/core/compute_backend.h"
#include "kvtier/core/status.h"
#include "kvtier/storage/slot_allocator.h"

namespace kvtier::storage {

// Device-memory slots of the gpu tier: the allocation through the backend
// (device memory on CUDA, a host stand-in on the CPU backend) plus O(1) slots.
class DeviceArena {
 public:
  // Device OOM is an error naming the bytes asked and free.
  static Result<std::unique_ptr<DeviceArena>> create(ComputeBackend& backend, uint64_t budget_bytes,
                                                     uint64_t slot_bytes);

  std::optional<uint32_t> allocate() { return slots_.allocate(); }
  void free(uint32_t slot) { slots_.free(slot); }
  // Consecutive slots [first, first + count), one contiguous device range
  // (SlotAllocator::allocate_run); each is freed with free().
  std::optional<uint32_t> allocate_run(uint32_t count) { return slots_.allocate_run(count); }
  std::byte* slot_data(uint32_t slot) const;  // a device pointer on CUDA
  uint32_t capacity() const { return slots_.capacity(); }
  uint32_t free_count() const { return slots_.free_count(); }
  uint64_t slot_bytes() const { return slot_bytes_; }

 private:
  DeviceArena(DeviceMemory memory, uint64_t slot_bytes, uint32_t slots);
  DeviceMemory memory_;
  uint64_t slot_bytes_;
  SlotAllocator slots_;
};

}  // namespace kvtier::storage
