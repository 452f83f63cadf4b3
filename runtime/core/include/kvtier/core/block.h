// Blocks: the unit of selection, residency and I/O (DESIGN.md section 2).
// One block = K then V of chunk_tokens consecutive tokens of one (layer, kv_head):
//   K[chunk_tokens][head_dim] bf16, then V[chunk_tokens][head_dim] bf16.
#pragma once

#include <compare>
#include <cstdint>
#include <ostream>

#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"

namespace kvtier {

struct BlockId {
  uint32_t layer = 0;
  uint32_t kv_head = 0;
  uint32_t chunk = 0;  // chunk index within the sequence: tokens [chunk*C, (chunk+1)*C)
  friend auto operator<=>(const BlockId&, const BlockId&) = default;
};

std::ostream& operator<<(std::ostream& os, const BlockId& id);

// Alignment of block slots in every tier: O_DIRECT needs 4 KiB on NVMe, and
// the same alignment keeps host slots registrable as io_uring fixed buffers.
inline constexpr uint64_t kBlockAlignBytes = 4096;

// Byte layout of a block and dense numbering of a sequence's blocks.
class BlockGeometry {
 public:
  // shape and policy must be valid (validate() them first).
  BlockGeometry(const ModelShape& shape, uint32_t chunk_tokens);

  uint32_t chunk_tokens() const { return chunk_tokens_; }
  uint32_t head_dim() const { return head_dim_; }
  uint64_t k_bytes() const { return k_bytes_; }          // bytes of K in a block
  uint64_t k_offset_bytes() const { return 0; }          // K comes first
  uint64_t v_offset_bytes() const { return k_bytes_; }   // V follows K
  uint64_t block_bytes() const { return 2 * k_bytes_; }  // K + V payload
  // Block bytes rounded up to kBlockAlignBytes: the stride of slots and file offsets.
  uint64_t slot_bytes() const;

  // Blocks needed to hold `tokens` tokens of one (layer, kv_head).
  uint32_t chunks_for(uint64_t tokens) const;
  // Dense index of a block in a sequence of `chunks_per_head` chunks:
  // ((layer * kv_heads) + kv_head) * chunks_per_head + chunk.
  uint64_t flat_index(const BlockId& id, uint32_t chunks_per_head) const;
  BlockId from_flat_index(uint64_t index, uint32_t chunks_per_head) const;
  uint64_t block_count(uint32_t chunks_per_head) const;

 private:
  uint32_t layers_;
  uint32_t kv_heads_;
  uint32_t head_dim_;
  uint32_t chunk_tokens_;
  uint64_t k_bytes_;
};

}  // namespace kvtier
