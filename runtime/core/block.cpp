#include "kvtier/core/block.h"

namespace kvtier {

std::ostream& operator<<(std::ostream& os, const BlockId& id) {
  return os << "block(layer=" << id.layer << ", kv_head=" << id.kv_head << ", chunk=" << id.chunk << ")";
}

BlockGeometry::BlockGeometry(const ModelShape& shape, uint32_t chunk_tokens)
    : layers_(shape.layers),
      kv_heads_(shape.kv_heads),
      head_dim_(shape.head_dim),
      chunk_tokens_(chunk_tokens),
      k_bytes_(uint64_t{chunk_tokens} * shape.head_dim * dtype_bytes(shape.dtype)) {
  KVT_ASSERT(validate(shape).ok(), validate(shape).message());
  KVT_ASSERT(chunk_tokens >= kChunkTokensMin && chunk_tokens <= kChunkTokensMax, "chunk_tokens=", chunk_tokens);
}

uint64_t BlockGeometry::slot_bytes() const {
  return (block_bytes() + kBlockAlignBytes - 1) / kBlockAlignBytes * kBlockAlignBytes;
}

uint32_t BlockGeometry::chunks_for(uint64_t tokens) const {
  const uint64_t chunks = (tokens + chunk_tokens_ - 1) / chunk_tokens_;
  KVT_ASSERT(chunks <= UINT32_MAX, "tokens=", tokens, " needs more than 2^32 chunks");
  return static_cast<uint32_t>(chunks);
}

uint64_t BlockGeometry::flat_index(const BlockId& id, uint32_t chunks_per_head) const {
  KVT_ASSERT(id.layer < layers_ && id.kv_head < kv_heads_ && id.chunk < chunks_per_head, id,
             " outside layers=", layers_, " kv_heads=", kv_heads_, " chunks=", chunks_per_head);
  return (uint64_t{id.layer} * kv_heads_ + id.kv_head) * chunks_per_head + id.chunk;
}

BlockId BlockGeometry::from_flat_index(uint64_t index, uint32_t chunks_per_head) const {
  KVT_ASSERT(index < block_count(chunks_per_head), "flat index ", index, " >= ", block_count(chunks_per_head));
  const uint64_t head_row = index / chunks_per_head;
  return BlockId{static_cast<uint32_t>(head_row / kv_heads_), static_cast<uint32_t>(head_row % kv_heads_),
                 static_cast<uint32_t>(index % chunks_per_head)};
}

uint64_t BlockGeometry::block_count(uint32_t chunks_per_head) const {
  return uint64_t{layers_} * kv_heads_ * chunks_per_head;
}

}  // namespace kvtier
