// BlockTable: where every block of a context is (DESIGN.md section 2).
// block -> {home tier and slot, gpu slot, host-cache slot, pins, last-used
// step, checksum}. Not thread-safe by itself: TieredStore guards it with its
// lock. Cached copies are tracked by pluggable eviction policies; a block
// with a pin in a tier is taken out of that tier's policy, so it can never
// be chosen as a victim, and victim selection stays O(1).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace kvtier::storage {

enum class Tier : uint8_t { kGpu, kHost, kNvme };
std::string_view tier_name(Tier tier);

inline constexpr uint32_t kNoSlot = UINT32_MAX;

struct BlockEntry {
  Tier home = Tier::kNvme;          // kHost or kNvme once assigned
  bool home_assigned = false;
  bool home_valid = false;          // the home holds a complete, written copy
  uint32_t home_slot = kNoSlot;     // host-home arena slot (home == kHost)
  uint32_t gpu_slot = kNoSlot;      // device arena slot of the cached gpu copy
  bool gpu_ready = false;           // gpu copy complete (false while it is being copied)
  uint32_t host_cache_slot = kNoSlot;  // staging arena slot of an nvme home's host copy
  bool host_cache_ready = false;
  uint32_t gpu_pins = 0;            // pins of the gpu copy (protection counts as one)
  uint32_t host_pins = 0;           // pins of the host copy (home or cache)
  bool gpu_protected = false;       // sink or window block: kept on the gpu
  bool busy = false;                // being written home: not movable meanwhile
  uint64_t last_used_step = 0;
  uint32_t checksum = 0;            // CRC32C of the home copy (nvme homes)
};

// Chooses which cached copy of a tier to drop. Only unpinned cached blocks are
// in a policy; the store tells it about every change.
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual void inserted(uint32_t block) = 0;  // now cached and evictable
  virtual void touched(uint32_t block) = 0;   // used again (only if inserted)
  virtual void removed(uint32_t block) = 0;   // dropped, or pinned
  virtual std::optional<uint32_t> victim() const = 0;  // the next block to evict
  virtual uint32_t size() const = 0;
};

// Least-recently-used over dense block indices: O(1) for every operation.
std::unique_ptr<EvictionPolicy> make_lru_policy(uint32_t block_count);

// Two least-recently-used classes: a victim comes from the cheap class while
// it holds any block, else from the costly one; O(1) for every operation.
// `costly(block)` is asked once, when the block is inserted, and the block
// stays in that class until removed. For the gpu tier, costly = homed on
// NVMe: bringing such a copy back costs a drive read (~25 us of a 1.4 GB/s
// disk's time per 32 KiB block, plus the read's latency) where a host-homed
// one costs an upload or CPU attention (~1 us), so the gpu tier keeps the
// NVMe-homed blocks it holds while host-homed copies can make room.
std::unique_ptr<EvictionPolicy> make_home_aware_policy(uint32_t block_count, std::function<bool(uint32_t)> costly);

class BlockTable {
 public:
  BlockTable(uint32_t block_count, std::unique_ptr<EvictionPolicy> gpu_policy,
             std::unique_ptr<EvictionPolicy> host_cache_policy);

  uint32_t size() const { return static_cast<uint32_t>(entries_.size()); }
  BlockEntry& operator[](uint32_t block);
  const BlockEntry& operator[](uint32_t block) const;

  // A gpu / host-cache copy became ready: it joins the policy unless pinned.
  void gpu_cached(uint32_t block);
  void host_cached(uint32_t block);
  // A copy is dropped (its slot must be freed by the caller).
  void gpu_dropped(uint32_t block);
  void host_cache_dropped(uint32_t block);

  // Pins: 0 -> 1 takes the copy out of its policy; 1 -> 0 puts it back as most recent.
  void pin_gpu(uint32_t block);
  void unpin_gpu(uint32_t block);
  void pin_host(uint32_t block);
  void unpin_host(uint32_t block);
  void touch(uint32_t block, uint64_t step);
  // Sink/window protection: a protected gpu copy holds one pin while ready.
  void set_gpu_protected(uint32_t block, bool on);
  // Pins held by users, not counting protection.
  uint32_t user_gpu_pins(uint32_t block) const;

  EvictionPolicy& gpu_policy() { return *gpu_policy_; }
  EvictionPolicy& host_cache_policy() { return *host_cache_policy_; }

 private:
  bool host_copy_is_cache(const BlockEntry& e) const { return e.home == Tier::kNvme; }
  std::vector<BlockEntry> entries_;
  std::unique_ptr<EvictionPolicy> gpu_policy_;
  std::unique_ptr<EvictionPolicy> host_cache_policy_;
};

}  // namespace kvtier::storage
