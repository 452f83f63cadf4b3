// The fp64 reference (oracle) for decode attention. Slow and simple on purpose:
// every kernel, CPU or GPU, is tested against it. Inputs are bf16 as the
// model produced them; all arithmetic is in double.
#pragma once

#include <cstdint>
#include <vector>

#include "kvtier/core/tensor.h"
#include "kvtier/cpu/partial_state.h"

namespace kvtier::cpu::ref {

// K and V of one layer, contiguous per KV head: [kv_heads][tokens][head_dim] bf16.
struct LayerKv {
  Bf16View<3> k;
  Bf16View<3> v;
  uint32_t kv_heads() const { return static_cast<uint32_t>(k.extent(0)); }
  uint64_t tokens() const { return k.extent(1); }
  uint32_t head_dim() const { return static_cast<uint32_t>(k.extent(2)); }
};

// One block as stored: K [tokens][head_dim] and V [tokens][head_dim], where
// tokens <= chunk_tokens (the tail block of a sequence may be partly filled).
struct BlockKv {
  Bf16View<2> k;
  Bf16View<2> v;
};

// Softmax scale used when the model says nothing else: 1/sqrt(head_dim).
double default_scale(uint32_t head_dim);

// Dense decode attention of q [q_heads][head_dim] over every token of kv.
// GQA: q head g reads KV head g / (q_heads / kv_heads).
PartialState64 dense_attention(Bf16View<2> q, const LayerKv& kv, double scale);

// Attention of q over an arbitrary list of blocks per KV head:
// blocks[kv_head] lists that head's blocks, in any order, possibly none.
PartialState64 attend_blocks(Bf16View<2> q, const std::vector<std::vector<BlockKv>>& blocks, double scale);

// The blocks of kv covering chunk indices chunks[kv_head] (chunks of
// chunk_tokens tokens; the last chunk of the context may be partial).
std::vector<std::vector<BlockKv>> blocks_of(const LayerKv& kv, uint32_t chunk_tokens,
                                            const std::vector<std::vector<uint32_t>>& chunks);

}  // namespace kvtier::cpu::ref
