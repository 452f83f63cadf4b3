#include "kvtier/storage/slot_allocator.h"

#include <algorithm>

#include "kvtier/core/assert.h"

namespace kvtier::storage {

SlotAllocator::SlotAllocator(uint32_t capacity) : capacity_(capacity), in_use_(capacity, 0) {
  // Pushed in reverse so that a fresh allocator hands out 0, 1, 2, ...: the
  // first blocks of a sequence land in neighbouring slots.
  free_.reserve(capacity);
  for (uint32_t i = capacity; i > 0; --i) free_.push_back(i - 1);
}

std::optional<uint32_t> SlotAllocator::allocate() {
  std::lock_guard lock(mu_);
  if (free_.empty()) return std::nullopt;
  const uint32_t slot = free_.back();
  free_.pop_back();
  in_use_[slot] = 1;
  return slot;
}

void SlotAllocator::free(uint32_t slot) {
  KVT_ASSERT(slot < capacity_, "slot ", slot, " is out of range (capacity ", capacity_, ")");
  std::lock_guard lock(mu_);
  KVT_ASSERT(in_use_[slot] != 0, "slot ", slot, " freed twice or never allocated");
  in_use_[slot] = 0;
  free_.push_back(slot);
}

std::optional<uint32_t> SlotAllocator::allocate_run(uint32_t count) {
  std::lock_guard lock(mu_);
  if (count == 0 || count > free_.size()) return std::nullopt;
  uint32_t run = 0;
  for (uint32_t s = 0; s < capacity_; ++s) {
    run = in_use_[s] != 0 ? 0 : run + 1;
    if (run < count) continue;
    const uint32_t first = s + 1 - count;
    for (uint32_t i = first; i <= s; ++i) in_use_[i] = 1;
    free_.erase(std::remove_if(free_.begin(), free_.end(), [&](uint32_t x) { return x >= first && x <= s; }),
                free_.end());
    return first;
  }
  return std::nullopt;
}

uint32_t SlotAllocator::free_count() const {
  std::lock_guard lock(mu_);
  return static_cast<uint32_t>(free_.size());
}

}  // namespace kvtier::storage
