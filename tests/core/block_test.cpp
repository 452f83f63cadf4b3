#include <doctest/doctest.h>

#include "kvtier/core/block.h"

using namespace kvtier;

TEST_CASE("block geometry at the defaults: 32 KiB blocks, K then V") {
  const BlockGeometry g(llama31_8b_shape(), 64);
  CHECK(g.block_bytes() == 32 * 1024);
  CHECK(g.k_offset_bytes() == 0);
  CHECK(g.v_offset_bytes() == 16 * 1024);
  CHECK(g.slot_bytes() == 32 * 1024);
  CHECK(g.chunks_for(1 << 20) == 16384);
  CHECK(g.chunks_for(65) == 2);
  CHECK(g.chunks_for(0) == 0);
}

TEST_CASE("slots are padded to the 4 KiB alignment of O_DIRECT") {
  ModelShape s = llama31_8b_shape();
  s.head_dim = 64;
  const BlockGeometry g(s, 16);  // 16 x 64 x 2 B = 2 KiB of K: 4 KiB block
  CHECK(g.block_bytes() == 4096);
  CHECK(g.slot_bytes() % kBlockAlignBytes == 0);
  const BlockGeometry tiny(ModelShape{1, 1, 1, 64, DType::kBf16}, 16);
  CHECK(tiny.slot_bytes() == 4096);
}

TEST_CASE("flat indices number a sequence's blocks densely and invert") {
  const BlockGeometry g(ModelShape{3, 8, 2, 64, DType::kBf16}, 32);
  const uint32_t chunks = 17;
  CHECK(g.block_count(chunks) == 3 * 2 * 17);
  uint64_t expected = 0;
  for (uint32_t l = 0; l < 3; ++l)
    for (uint32_t h = 0; h < 2; ++h)
      for (uint32_t c = 0; c < chunks; ++c) {
        const BlockId id{l, h, c};
        CHECK(g.flat_index(id, chunks) == expected);
        CHECK(g.from_flat_index(expected, chunks) == id);
        ++expected;
      }
}
