// O(1) allocation and free of fixed-size slot indices [0, capacity).
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

namespace kvtier::storage {

// Thread-safe free list of slot indices. Freeing a slot that is not allocated
// is a bug and asserts.
class SlotAllocator {
 public:
  explicit SlotAllocator(uint32_t capacity);

  std::optional<uint32_t> allocate();  // nullopt when every slot is taken
  void free(uint32_t slot);
  // `count` consecutive free slots [first, first + count), the lowest such
  // run; nullopt when no run is that long (or count is 0). O(capacity): for
  // rare, long-lived allocations. Each slot of the run is freed by free().
  std::optional<uint32_t> allocate_run(uint32_t count);
  uint32_t capacity() const { return capacity_; }
  uint32_t free_count() const;

 private:
  const uint32_t capacity_;
  mutable std::mutex mu_;
  std::vector<uint32_t> free_;     // stack of free slots
  std::vector<uint8_t> in_use_;    // catches double frees
};

}  // namespace kvtier::storage
