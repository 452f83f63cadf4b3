// The tiered store over the CUDA backend: host and nvme homes uploaded into
// real device slots by the batched copy, read back bit-exact, with eviction.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "kvtier/gpu/cuda_backend.h"
#include "kvtier/storage/tiered_store.h"
#include "random.h"
#include "skip.h"

using namespace kvtier;
using namespace kvtier::storage;

namespace {

void fill_block(std::byte* dst, uint64_t bytes, uint32_t b) {
  auto gen = test::rng(b);
  for (uint64_t i = 0; i < bytes; i += 8) {
    const uint64_t z = gen();
    std::memcpy(dst + i, &z, 8);
  }
}

}  // namespace

TEST_CASE("blocks from host and nvme homes land bit-exact in gpu slots") {
  auto backend = gpu::make_cuda_backend();
  test::require(backend.ok(), "no CUDA GPU: " + backend.status().message());
  for (gpu::BatchCopyMethod method : {gpu::BatchCopyMethod::kGatherKernel, gpu::BatchCopyMethod::kMemcpyBatch}) {
    gpu::set_batch_copy_method(**backend, method);
    StoreConfig c;
    c.shape = ModelShape{2, 8, 2, 64, DType::kBf16};
    c.max_tokens = 1 << 17;  // 8192 blocks of 16 KiB
    c.budgets = TierBudgets{1024 * 16 * 1024, 48 << 20, 16 << 20};
    const BlockGeometry g(c.shape, c.policy.chunk_tokens);
    const FileGeometry fg{c.shape, c.policy.chunk_tokens, g.chunks_for(c.max_tokens)};
    auto file = BlockFile::create_on(make_fault_device(make_fault_medium(), "mem", FaultConfig{}), fg);
    REQUIRE(file.ok());
    auto store = TieredStore::create(**backend, c, std::move(file).value());
    REQUIRE_MESSAGE(store.ok(), store.status().to_string());
    TieredStore& s = **store;
    const uint64_t bytes = s.block_bytes();
    std::vector<std::byte> data(bytes), back(bytes);
    for (uint32_t b = 0; b < s.block_count(); ++b) {
      fill_block(data.data(), bytes, b);
      REQUIRE(s.write_home(b, data.data()).ok());
    }
    uint64_t wrong = 0;
    for (uint32_t first = 0; first < s.block_count(); first += 1000) {
      std::vector<uint32_t> blocks;
      for (uint32_t b = first; b < std::min(s.block_count(), first + 1000); b += 1) blocks.push_back(b);
      const Status st = s.wait(s.prefetch(blocks, Tier::kGpu));
      REQUIRE_MESSAGE(st.ok(), st.to_string());
      for (uint32_t b : blocks) {
        Result<BlockPin> pin = s.pin(b, Tier::kGpu);
        REQUIRE(pin.ok());
        const BlockCopy copy{pin->data(), back.data(), bytes};
        REQUIRE(s.backend().copy_to_host(std::span<const BlockCopy>(&copy, 1)).ok());
        fill_block(data.data(), bytes, b);
        wrong += std::memcmp(back.data(), data.data(), bytes) != 0;
      }
    }
    CHECK(wrong == 0);
    CHECK(s.stats().gpu_evictions > 0);
    CHECK(s.stats().h2d_batches >= 9);
    MESSAGE(s.describe());
  }
}
