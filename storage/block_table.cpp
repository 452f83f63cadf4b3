#include "kvtier/storage/block_table.h"

#include "kvtier/core/assert.h"

namespace kvtier::storage {

std::string_view tier_name(Tier tier) {
  switch (tier) {
    case Tier::kGpu: return "gpu";
    case Tier::kHost: return "host";
    case Tier::kNvme: return "nvme";
  }
  return "?";
}

namespace {

// Doubly linked list threaded through arrays indexed by block: most recent at
// head_, least recent at tail_.
class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(uint32_t n) : prev_(n, kNone), next_(n, kNone), in_(n, 0) {}

  void inserted(uint32_t b) override {
    KVT_ASSERT(!in_[b], "block ", b, " inserted twice");
    in_[b] = 1;
    link_front(b);
    ++size_;
  }
  void touched(uint32_t b) override {
    if (!in_[b] || head_ == b) return;
    unlink(b);
    link_front(b);
  }
  void removed(uint32_t b) override {
    if (!in_[b]) return;
    unlink(b);
    in_[b] = 0;
    --size_;
  }
  std::optional<uint32_t> victim() const override {
    return tail_ == kNone ? std::nullopt : std::optional<uint32_t>(tail_);
  }
  uint32_t size() const override { return size_; }

 private:
  static constexpr uint32_t kNone = UINT32_MAX;

  void link_front(uint32_t b) {
    prev_[b] = kNone;
    next_[b] = head_;
    if (head_ != kNone) prev_[head_] = b;
    head_ = b;
    if (tail_ == kNone) tail_ = b;
  }
  void unlink(uint32_t b) {
    (prev_[b] != kNone ? next_[prev_[b]] : head_) = next_[b];
    (next_[b] != kNone ? prev_[next_[b]] : tail_) = prev_[b];
    prev_[b] = next_[b] = kNone;
  }

  std::vector<uint32_t> prev_, next_;
  std::vector<uint8_t> in_;
  uint32_t head_ = kNone, tail_ = kNone, size_ = 0;
};

// Victims from `cheap_` first. Each block is in the class it was inserted in
// (class_), so a later change of what `costly_` says cannot misplace it.
class HomeAwarePolicy final : public EvictionPolicy {
 public:
  HomeAwarePolicy(uint32_t n, std::function<bool(uint32_t)> costly)
      : cheap_(n), dear_(n), class_(n, kOut), costly_(std::move(costly)) {}

  void inserted(uint32_t b) override {
    KVT_ASSERT(class_[b] == kOut, "block ", b, " inserted twice");
    const bool dear = costly_(b);
    class_[b] = dear ? kDear : kCheap;
    (dear ? dear_ : cheap_).inserted(b);
  }
  void touched(uint32_t b) override {
    if (class_[b] != kOut) of(b).touched(b);
  }
  void removed(uint32_t b) override {
    if (class_[b] == kOut) return;
    of(b).removed(b);
    class_[b] = kOut;
  }
  std::optional<uint32_t> victim() const override {
    return cheap_.size() > 0 ? cheap_.victim() : dear_.victim();
  }
  uint32_t size() const override { return cheap_.size() + dear_.size(); }

 private:
  static constexpr uint8_t kOut = 0, kCheap = 1, kDear = 2;
  LruPolicy& of(uint32_t b) { return class_[b] == kDear ? dear_ : cheap_; }

  LruPolicy cheap_, dear_;
  std::vector<uint8_t> class_;
  std::function<bool(uint32_t)> costly_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_lru_policy(uint32_t block_count) {
  return std::make_unique<LruPolicy>(block_count);
}

std::unique_ptr<EvictionPolicy> make_home_aware_policy(uint32_t block_count, std::function<bool(uint32_t)> costly) {
  KVT_ASSERT(costly != nullptr, "make_home_aware_policy: no cost predicate");
  return std::make_unique<HomeAwarePolicy>(block_count, std::move(costly));
}

BlockTable::BlockTable(uint32_t block_count, std::unique_ptr<EvictionPolicy> gpu_policy,
                       std::unique_ptr<EvictionPolicy> host_cache_policy)
    : entries_(block_count), gpu_policy_(std::move(gpu_policy)), host_cache_policy_(std::move(host_cache_policy)) {}

BlockEntry& BlockTable::operator[](uint32_t block) {
  KVT_ASSERT(block < entries_.size(), "block ", block, " of ", entries_.size());
  return entries_[block];
}

const BlockEntry& BlockTable::operator[](uint32_t block) const {
  KVT_ASSERT(block < entries_.size(), "block ", block, " of ", entries_.size());
  return entries_[block];
}

void BlockTable::gpu_cached(uint32_t b) {
  BlockEntry& e = (*this)[b];
  KVT_ASSERT(e.gpu_slot != kNoSlot && !e.gpu_ready, "block ", b);
  e.gpu_ready = true;
  if (e.gpu_protected) ++e.gpu_pins;  // sinks and window stay on the gpu
  if (e.gpu_pins == 0) gpu_policy_->inserted(b);
}

void BlockTable::host_cached(uint32_t b) {
  BlockEntry& e = (*this)[b];
  KVT_ASSERT(e.host_cache_slot != kNoSlot && !e.host_cache_ready, "block ", b);
  e.host_cache_ready = true;
  if (e.host_pins == 0) host_cache_policy_->inserted(b);
}

void BlockTable::gpu_dropped(uint32_t b) {
  BlockEntry& e = (*this)[b];
  KVT_ASSERT(user_gpu_pins(b) == 0 || !e.gpu_ready, "dropping pinned gpu copy of block ", b, " pins ", e.gpu_pins);
  if (e.gpu_ready && e.gpu_protected) --e.gpu_pins;  // the protection pin goes with the copy
  gpu_policy_->removed(b);
  e.gpu_slot = kNoSlot;
  e.gpu_ready = false;
}

void BlockTable::host_cache_dropped(uint32_t b) {
  BlockEntry& e = (*this)[b];
  KVT_ASSERT(e.host_pins == 0 || !e.host_cache_ready, "dropping pinned host copy of block ", b);
  host_cache_policy_->removed(b);
  e.host_cache_slot = kNoSlot;
  e.host_cache_ready = false;
}

void BlockTable::pin_gpu(uint32_t b) {
  BlockEntry& e = (*this)[b];
  if (e.gpu_pins++ == 0) gpu_policy_->removed(b);
}

void BlockTable::unpin_gpu(uint32_t b) {
  BlockEntry& e = (*this)[b];
  KVT_ASSERT(e.gpu_pins > 0, "unpin of unpinned gpu copy of block ", b);
  if (--e.gpu_pins == 0 && e.gpu_ready) gpu_policy_->inserted(b);
}

void BlockTable::pin_host(uint32_t b) {
  BlockEntry& e = (*this)[b];
  if (e.host_pins++ == 0 && host_copy_is_cache(e)) host_cache_policy_->removed(b);
}

void BlockTable::unpin_host(uint32_t b) {
  BlockEntry& e = (*this)[b];
  KVT_ASSERT(e.host_pins > 0, "unpin of unpinned host copy of block ", b);
  if (--e.host_pins == 0 && host_copy_is_cache(e) && e.host_cache_ready) host_cache_policy_->inserted(b);
}

void BlockTable::set_gpu_protected(uint32_t b, bool on) {
  BlockEntry& e = (*this)[b];
  if (e.gpu_protected == on) return;
  e.gpu_protected = on;
  if (!e.gpu_ready) return;
  if (on)
    pin_gpu(b);
  else
    unpin_gpu(b);
}

uint32_t BlockTable::user_gpu_pins(uint32_t b) const {
  const BlockEntry& e = (*this)[b];
  return e.gpu_pins - (e.gpu_protected && e.gpu_ready ? 1 : 0);
}

void BlockTable::touch(uint32_t b, uint64_t step) {
  BlockEntry& e = (*this)[b];
  e.last_used_step = step;
  gpu_policy_->touched(b);
  if (host_copy_is_cache(e)) host_cache_policy_->touched(b);
}

}  // namespace kvtier::storage
