// Private to gpu/: the one check of a SlotArenaView that every kernel family
// (decode, prefill, append, summaries) applies, so that an arena one of them
// accepts is accepted by all; and the GQA head check decode and scoring share.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/core/status.h"
#include "kvtier/gpu/kernels.h"

namespace kvtier::gpu {

// Base non-null and 16-byte aligned (kernels move 16-byte vectors), head dim
// 64 or 128, chunk_tokens a power of two in 16..256 (decode indexes blocks by
// shift and mask), at least one slot of at least one block's K and V.
inline Status check_arena_view(std::string_view what, const SlotArenaView& a) {
  const std::string w(what);
  if (a.base == nullptr) return invalid_argument(w + ": arena.base is null; pass the slot arena's device pointer");
  if (reinterpret_cast<uintptr_t>(a.base) % 16 != 0)
    return invalid_argument(w + ": arena.base is not 16-byte aligned; allocate the arena with cudaMalloc");
  if (a.head_dim != 64 && a.head_dim != 128)
    return invalid_field(w, "arena.head_dim", a.head_dim, "is unsupported (supported: 64, 128)");
  const uint32_t c = a.chunk_tokens;
  if (c < 16 || c > 256 || (c & (c - 1)) != 0)
    return invalid_field(w, "arena.chunk_tokens", c, "is unsupported (supported: 16, 32, 64, 128, 256)");
  if (a.slots == 0) return invalid_field(w, "arena.slots", 0, "must be at least 1");
  const uint64_t block_bytes = 2ull * c * a.head_dim * sizeof(bf16);
  if (a.slot_bytes < block_bytes || a.slot_bytes % 16 != 0)
    return invalid_field(w, "arena.slot_bytes", a.slot_bytes,
                         "must be a multiple of 16 and at least " + std::to_string(block_bytes) +
                             " (K and V of one block: 2 * chunk_tokens * head_dim * 2 bytes)");
  return Status::ok_status();
}

// KV heads >= 1 and q_heads a multiple of them in one of the GQA groups the
// kernels are instantiated for (1, 2, 4, 8).
inline Status check_gqa_heads(std::string_view what, uint32_t q_heads, uint32_t kv_heads) {
  const std::string w(what);
  if (kv_heads == 0) return invalid_field(w, "kv_heads", kv_heads, "must be at least 1");
  if (q_heads == 0 || q_heads % kv_heads != 0)
    return invalid_field(w, "q_heads", q_heads, "must be a positive multiple of kv_heads=" + std::to_string(kv_heads));
  const uint32_t group = q_heads / kv_heads;
  if (group != 1 && group != 2 && group != 4 && group != 8)
    return invalid_field(w, "q_heads / kv_heads", group, "is an unsupported GQA group (supported: 1, 2, 4, 8)");
  return Status::ok_status();
}

}  // namespace kvtier::gpu
