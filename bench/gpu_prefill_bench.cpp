// Part of `kvtier bench gpu`: block-sparse prefill attention against the
// tensor-core ceiling of this device, a large cuBLAS bf16 GEMM measured in the
// same run. The prefill case is one Llama-3.1-8B layer (32 q heads, 8 KV heads,
// head dim 128, 64-token chunks): an 8K-query block attending, per KV head,
// 2 sink blocks, the 64 window blocks just before it, its own 128 chunks
// (causal) and 64 selected earlier blocks. Timing by CUDA events, median of
// the repeats after warm-up. No CUDA header here: CPU-only builds compile it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gpu_suites.h"
#include "kvtier/gpu/cuda_context.h"
#include "kvtier/gpu/gemm.h"
#include "kvtier/gpu/kernels.h"

namespace kvtier::bench {
namespace {

// Random bf16 in about [-1, 1): never zeros, which can run faster than real data.
std::vector<bf16> random_bf16(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<bf16> out(n);
  for (size_t i = 0; i + 4 <= n; i += 4) {
    const uint64_t r = gen();
    for (int j = 0; j < 4; ++j) {
      // Sign and 7 mantissa bits random, exponent 126 or 125: |x| in [0.25, 1).
      const uint16_t w = static_cast<uint16_t>(r >> (16 * j));
      out[i + j] = bf16::from_bits(static_cast<uint16_t>((w & 0x807f) | ((125 + (w >> 14 & 1)) << 7)));
    }
  }
  for (size_t i = n / 4 * 4; i < n; ++i) out[i] = bf16::from_float(0.5f);
  return out;
}

Result<DeviceMemory> upload_new(gpu::CudaContext& ctx, const void* host, uint64_t bytes) {
  KVT_ASSIGN_OR_RETURN(DeviceMemory mem, ctx.allocate(bytes));
  KVT_RETURN_IF_ERROR(ctx.upload(mem.data(), host, bytes));
  return mem;
}

// Median milliseconds of `launch` on the compute stream, timed by events
// around each repeat, after `warmup` untimed runs. The first failure is returned.
Result<double> median_ms(gpu::CudaContext& ctx, const std::function<Status()>& launch, int warmup, int repeats) {
  const cudaStream_t stream = ctx.compute_stream();
  for (int i = 0; i < warmup; ++i) KVT_RETURN_IF_ERROR(launch());
  KVT_RETURN_IF_ERROR(ctx.synchronize(stream));
  KVT_ASSIGN_OR_RETURN(gpu::Event start, gpu::Event::create());
  KVT_ASSIGN_OR_RETURN(gpu::Event stop, gpu::Event::create());
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    KVT_RETURN_IF_ERROR(start.record(stream));
    KVT_RETURN_IF_ERROR(launch());
    KVT_RETURN_IF_ERROR(stop.record(stream));
    KVT_RETURN_IF_ERROR(stop.synchronize());
    KVT_ASSIGN_OR_RETURN(float t, gpu::Event::elapsed_ms(start, stop));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// ---- cuBLAS bf16 GEMM: the tensor-core ceiling ------------------------------

Result<double> gemm_tflops(gpu::CudaContext& ctx, uint32_t size, int warmup, int repeats) {
  const uint64_t elems = uint64_t{size} * size;
  const std::vector<bf16> a = random_bf16(elems, 1), b = random_bf16(elems, 2);
  KVT_ASSIGN_OR_RETURN(DeviceMemory d_a, upload_new(ctx, a.data(), elems * sizeof(bf16)));
  KVT_ASSIGN_OR_RETURN(DeviceMemory d_b, upload_new(ctx, b.data(), elems * sizeof(bf16)));
  KVT_ASSIGN_OR_RETURN(DeviceMemory d_c, ctx.allocate(elems * sizeof(float)));
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<gpu::Gemm> gemm, gpu::Gemm::create());
  const auto launch = [&] {
    return gemm->bf16_nt(reinterpret_cast<const bf16*>(d_a.data()), size, reinterpret_cast<const bf16*>(d_b.data()),
                         size, reinterpret_cast<float*>(d_c.data()), size, size, size, size, 1.f,
                         ctx.compute_stream());
  };
  KVT_ASSIGN_OR_RETURN(double ms, median_ms(ctx, launch, warmup, repeats));
  return 2.0 * size * double(size) * size / (ms * 1e-3) / 1e12;
}

// ---- Block-sparse prefill ---------------------------------------------------

constexpr uint32_t kQHeads = 32, kKvHeads = 8, kHeadDim = 128, kChunk = 64;
constexpr uint32_t kSinkBlocks = 2, kWindowBlocks = 64, kSelectedBlocks = 64;
constexpr uint32_t kHistoryChunks = 1024;  // the query block starts at 64K tokens

// Per KV head: the block list (chunk indices) the query block attends.
struct PrefillLists {
  std::vector<uint32_t> list_begin = {0};
  std::vector<uint64_t> first_pos;
  std::vector<uint32_t> tokens;
};

PrefillLists make_lists(uint32_t nq, std::mt19937_64& gen) {
  PrefillLists l;
  const uint32_t own_chunks = (nq + kChunk - 1) / kChunk;
  for (uint32_t h = 0; h < kKvHeads; ++h) {
    std::vector<uint32_t> chunks;
    for (uint32_t c = 0; c < kSinkBlocks; ++c) chunks.push_back(c);
    std::vector<uint32_t> pool(kHistoryChunks - kWindowBlocks - kSinkBlocks);
    std::iota(pool.begin(), pool.end(), kSinkBlocks);
    std::shuffle(pool.begin(), pool.end(), gen);
    chunks.insert(chunks.end(), pool.begin(), pool.begin() + kSelectedBlocks);
    for (uint32_t c = kHistoryChunks - kWindowBlocks; c < kHistoryChunks + own_chunks; ++c) chunks.push_back(c);
    std::shuffle(chunks.begin(), chunks.end(), gen);
    for (uint32_t c : chunks) {
      l.first_pos.push_back(uint64_t{c} * kChunk);
      l.tokens.push_back(kChunk);
    }
    l.list_begin.push_back(static_cast<uint32_t>(l.first_pos.size()));
  }
  return l;
}

// Unmasked (query, key) pairs summed over KV heads: a key at position p is
// seen by every query at position >= p.
uint64_t unmasked_pairs(const PrefillLists& l, uint64_t q_first_pos, uint32_t nq) {
  uint64_t pairs = 0;
  for (size_t j = 0; j < l.first_pos.size(); ++j)
    for (uint32_t t = 0; t < l.tokens[j]; ++t) {
      const uint64_t key = l.first_pos[j] + t, q_last = q_first_pos + nq - 1;
      if (key <= q_last) pairs += q_last - std::max(key, q_first_pos) + 1;
    }
  return pairs;
}

struct PrefillRig {
  std::vector<DeviceMemory> mem;
  gpu::PrefillArgs args;
};

Result<PrefillRig> make_prefill_rig(gpu::CudaContext& ctx, uint32_t nq, const PrefillLists& l) {
  PrefillRig rig;
  const uint32_t blocks = l.list_begin.back();
  const uint64_t slot_bytes = uint64_t{2} * kChunk * kHeadDim * sizeof(bf16);
  // Slots scattered in an arena of all the blocks, in random order.
  std::vector<uint32_t> slot_ids(blocks);
  std::iota(slot_ids.begin(), slot_ids.end(), 0u);
  std::shuffle(slot_ids.begin(), slot_ids.end(), std::mt19937_64(3));
  const std::vector<bf16> q = random_bf16(size_t{nq} * kQHeads * kHeadDim, 4);
  const std::vector<bf16> arena = random_bf16(blocks * slot_bytes / sizeof(bf16), 5);
  const auto add = [&](const void* host, uint64_t bytes) -> Result<std::byte*> {
    KVT_ASSIGN_OR_RETURN(DeviceMemory m, upload_new(ctx, host, bytes));
    rig.mem.push_back(std::move(m));
    return rig.mem.back().data();
  };
  gpu::PrefillArgs& a = rig.args;
  KVT_ASSIGN_OR_RETURN(std::byte * d_q, add(q.data(), q.size() * sizeof(bf16)));
  KVT_ASSIGN_OR_RETURN(std::byte * d_arena, add(arena.data(), arena.size() * sizeof(bf16)));
  KVT_ASSIGN_OR_RETURN(std::byte * d_begin, add(l.list_begin.data(), l.list_begin.size() * sizeof(uint32_t)));
  KVT_ASSIGN_OR_RETURN(std::byte * d_slots, add(slot_ids.data(), slot_ids.size() * sizeof(uint32_t)));
  KVT_ASSIGN_OR_RETURN(std::byte * d_first, add(l.first_pos.data(), l.first_pos.size() * sizeof(uint64_t)));
  KVT_ASSIGN_OR_RETURN(std::byte * d_tokens, add(l.tokens.data(), l.tokens.size() * sizeof(uint32_t)));
  KVT_ASSIGN_OR_RETURN(DeviceMemory out, ctx.allocate(uint64_t{nq} * kQHeads * kHeadDim * sizeof(bf16)));
  KVT_ASSIGN_OR_RETURN(DeviceMemory lse, ctx.allocate(uint64_t{nq} * kQHeads * sizeof(float)));
  a.q = reinterpret_cast<const bf16*>(d_q);
  a.nq = nq;
  a.q_heads = kQHeads;
  a.kv_heads = kKvHeads;
  a.q_first_pos = uint64_t{kHistoryChunks} * kChunk;
  a.arena = {d_arena, slot_bytes, blocks, kChunk, kHeadDim};
  a.list_begin = reinterpret_cast<const uint32_t*>(d_begin);
  a.slot_ids = reinterpret_cast<const uint32_t*>(d_slots);
  a.block_first_pos = reinterpret_cast<const uint64_t*>(d_first);
  a.block_tokens = reinterpret_cast<const uint32_t*>(d_tokens);
  a.scale = 0.08838834764831845f;  // 1/sqrt(128)
  a.out_bf16 = reinterpret_cast<bf16*>(out.data());
  a.lse = reinterpret_cast<float*>(lse.data());
  rig.mem.push_back(std::move(out));
  rig.mem.push_back(std::move(lse));
  return rig;
}

Status add_prefill(Report& report, gpu::CudaContext& ctx, int warmup, int repeats) {
  const uint32_t nq = 8192;
  std::mt19937_64 gen(20261128);
  const PrefillLists lists = make_lists(nq, gen);
  KVT_ASSIGN_OR_RETURN(PrefillRig rig, make_prefill_rig(ctx, nq, lists));
  const uint64_t pairs = unmasked_pairs(lists, rig.args.q_first_pos, nq);
  const double flops = 4.0 * kHeadDim * (kQHeads / kKvHeads) * double(pairs);
  report.set_config("prefill_shape", "Llama-3.1-8B layer: 32 q heads, 8 KV heads, head dim 128, chunk 64; 8192 "
                                     "queries at position 65536; per KV head 2 sink + 64 window + 64 selected + "
                                     "128 own (causal) blocks; outputs out_bf16 and lse");
  report.set_config("prefill_flops_rule",
                    "4 * head_dim * group * (unmasked (query, key) pairs summed over KV heads), counted exactly on "
                    "the host; masked and skipped pairs count nothing");
  report.set_config("prefill_unmasked_pairs", pairs);
  const auto launch = [&] { return gpu::prefill_attention(rig.args, ctx.compute_stream()); };
  KVT_ASSIGN_OR_RETURN(double ms, median_ms(ctx, launch, warmup, repeats));
  report.add("prefill_block_sparse", flops / (ms * 1e-3) / 1e12, "TFLOP/s", "cublas_bf16_gemm");
  report.add("prefill_block_sparse_ms", ms, "ms");
  return Status::ok_status();
}

}  // namespace

void add_prefill_results(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args) {
  const int warmup = args.quick ? 1 : 3, repeats = args.quick ? 3 : 10;
  const uint32_t gemm_size = args.quick ? 4096 : 8192;
  report.set_config("cublas_bf16_gemm_shape", std::to_string(gemm_size) + "^3, bf16 in, fp32 out, NT");
  run_part(report, "cublas_bf16_gemm", [&]() -> Status {
    KVT_ASSIGN_OR_RETURN(double tflops, gemm_tflops(ctx, gemm_size, warmup, repeats));
    report.add("cublas_bf16_gemm", tflops, "TFLOP/s");
    return Status::ok_status();
  });
  run_part(report, "prefill_block_sparse", [&] { return add_prefill(report, ctx, warmup, repeats); });
}

}  // namespace kvtier::bench
