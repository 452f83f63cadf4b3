// HostArena: pinned host RAM cut into fixed-size block slots (the host tier and
// the staging cache for nvme-homed blocks). Pinned through the backend
// (cudaHostRegister with a GPU, mlock otherwise), on huge pages where the
// kernel allows, placed on the NUMA node nearest the GPU when hwloc knows it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "kvtier/core/compute_backend.h"
#include "kvtier/core/status.h"
#include "kvtier/storage/slot_allocator.h"

namespace kvtier::storage {

struct HostArenaOptions {
  uint64_t budget_bytes = 0;  // the user's byte budget; slots = budget / slot_bytes
  uint64_t slot_bytes = 0;    // multiple of 4 KiB
  int numa_node = -1;         // -1: the node nearest the GPU if known, else no binding
  bool try_huge_pages = true;
};

class HostArena {
 public:
  // Fails at start, naming the numbers, when the budget exceeds the memory the
  // machine has available (MemAvailable), or is smaller than one slot.
  static Result<std::unique_ptr<HostArena>> create(ComputeBackend& backend, const HostArenaOptions& options);
  ~HostArena();

  std::optional<uint32_t> allocate() { return slots_.allocate(); }  // O(1)
  void free(uint32_t slot) { slots_.free(slot); }                   // O(1)
  std::byte* slot_data(uint32_t slot) const;                        // 4 KiB-aligned
  uint32_t capacity() const { return slots_.capacity(); }
  uint32_t free_count() const { return slots_.free_count(); }
  uint64_t slot_bytes() const { return slot_bytes_; }
  std::byte* base() const { return base_; }
  uint64_t bytes() const { return bytes_; }
  // How the memory ended up: "pinned (cudaHostRegister), huge pages, NUMA node 0".
  const std::string& describe() const { return description_; }

 private:
  HostArena(ComputeBackend& backend, std::byte* base, uint64_t bytes, uint64_t slot_bytes, uint32_t slots);

  ComputeBackend& backend_;
  std::byte* base_;
  uint64_t bytes_;
  uint64_t slot_bytes_;
  SlotAllocator slots_;
  bool pinned_ = false;
  std::string description_;
};

}  // namespace kvtier::storage
