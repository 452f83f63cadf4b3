// Part of `kvtier bench gpu`: moving blocks onto the GPU and writing them
// there. gather_blocks (1024 scattered 32 KiB blocks from a pinned host arena
// into scattered device slots, one batched call of the CUDA backend = one
// gather kernel) against one contiguous 32 MiB copy of the same bytes
// measured the same way; the decode-step append kernel; and the summary
// kernel's read bandwidth. No CUDA header here: CPU-only builds compile it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gpu_suites.h"
#include "h2d_rig.h"
#include "kvtier/core/assert.h"
#include "kvtier/gpu/cuda_backend.h"
#include "kvtier/gpu/kernels.h"
#include "kvtier/storage/device_arena.h"
#include "kvtier/storage/host_arena.h"

namespace kvtier::bench {
namespace {

// ---- Host -> device: scattered blocks vs one contiguous copy -----------------

Status add_copy_results(Report& report, int device, const SuiteArgs& args) {
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<ComputeBackend> backend, gpu::make_cuda_backend(device));
  KVT_ASSIGN_OR_RETURN(H2dRig rig, make_h2d_rig(*backend));
  // The ceiling: one DMA-engine copy of 32 contiguous MiB (a batch of one
  // cudaMemcpyBatchAsync copy), what the link gives at its best. Where the
  // runtime lacks that call, the gather kernel moves the single copy too.
  gpu::set_batch_copy_method(*backend, gpu::BatchCopyMethod::kMemcpyBatch);
  Result<double> single = h2d_copy_gbps(*backend, rig.single, false, args);
  std::string single_method = "one cudaMemcpyBatchAsync copy (DMA engine)";
  if (!single.ok()) {
    gpu::set_batch_copy_method(*backend, gpu::BatchCopyMethod::kGatherKernel);
    single = h2d_copy_gbps(*backend, rig.single, false, args);
    single_method = "gather kernel (cudaMemcpyBatchAsync unavailable)";
  }
  KVT_RETURN_IF_ERROR(single.status());
  report.add("h2d_single_copy_32mib", *single, "GB/s");
  gpu::set_batch_copy_method(*backend, gpu::BatchCopyMethod::kGatherKernel);
  KVT_ASSIGN_OR_RETURN(const double gather, h2d_copy_gbps(*backend, rig.scattered, false, args));
  report.add("gather_blocks", gather, "GB/s", "h2d_single_copy_32mib");
  report.set_config("gather", std::string(backend->name()) + "; 1024 scattered 32 KiB blocks, host arena " +
                                  rig.host->describe() + "; single copy by " + single_method +
                                  "; wall-clock median around the synchronous call");
  return Status::ok_status();
}

// ---- Kernels timed by events ----------------------------------------------------

// Median milliseconds per call of `launch` (which enqueues on the compute
// stream), from `per_repeat` back-to-back calls between two events.
Result<double> event_ms_per_call(gpu::CudaContext& ctx, const std::function<Status()>& launch, int per_repeat,
                                 const SuiteArgs& args) {
  KVT_ASSIGN_OR_RETURN(gpu::Event start, gpu::Event::create());
  KVT_ASSIGN_OR_RETURN(gpu::Event stop, gpu::Event::create());
  // A checked warm-up: launch errors and asynchronous faults are reported
  // before anything is timed.
  const int warmup = args.quick ? 2 : 5, repeats = args.quick ? 7 : 21;
  for (int i = 0; i < warmup; ++i) KVT_RETURN_IF_ERROR(launch());
  KVT_RETURN_IF_ERROR(ctx.synchronize_device());
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    KVT_RETURN_IF_ERROR(start.record(ctx.compute_stream()));
    for (int i = 0; i < per_repeat; ++i) KVT_RETURN_IF_ERROR(launch());
    KVT_RETURN_IF_ERROR(stop.record(ctx.compute_stream()));
    KVT_RETURN_IF_ERROR(stop.synchronize());
    KVT_ASSIGN_OR_RETURN(const float elapsed, gpu::Event::elapsed_ms(start, stop));
    ms.push_back(static_cast<double>(elapsed) / per_repeat);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Slot ids 0..count-1 in random order, uploaded.
Result<DeviceMemory> scattered_slot_ids(gpu::CudaContext& ctx, uint32_t count, uint32_t slots, uint64_t seed) {
  std::vector<uint32_t> ids(slots);
  for (uint32_t i = 0; i < slots; ++i) ids[i] = i;
  std::mt19937_64 gen(seed);
  std::shuffle(ids.begin(), ids.end(), gen);
  ids.resize(count);
  KVT_ASSIGN_OR_RETURN(DeviceMemory mem, ctx.allocate(count * sizeof(uint32_t)));
  KVT_RETURN_IF_ERROR(ctx.upload(mem.data(), ids.data(), count * sizeof(uint32_t)));
  return mem;
}

// Fills device memory with random bf16 in [-1, 1): summaries of real-looking
// numbers, never NaN or denormal.
Status fill_random_bf16(gpu::CudaContext& ctx, std::byte* dst, uint64_t bytes, uint64_t seed) {
  constexpr uint64_t kPiece = uint64_t{16} << 20;
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<bf16> piece(kPiece / sizeof(bf16));
  for (bf16& x : piece) x = bf16::from_float(dist(gen));
  // One random piece repeated: the kernel's speed does not depend on the values.
  for (uint64_t off = 0; off < bytes; off += kPiece)
    KVT_RETURN_IF_ERROR(ctx.upload(dst + off, piece.data(), std::min(kPiece, bytes - off)));
  return Status::ok_status();
}

// Decode append for batch 16 of Llama-3.1-8B (8 KV heads, head dim 128,
// chunk 64): one K and one V row per (sequence, head).
Status add_append_result(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args) {
  constexpr uint32_t kBatch = 16, kKvHeads = 8, kDim = 128, kChunk = 64;
  constexpr uint32_t kArenaSlots = 4096;
  const uint64_t slot_bytes = 2ull * kChunk * kDim * sizeof(bf16);
  KVT_ASSIGN_OR_RETURN(DeviceMemory arena, ctx.allocate(kArenaSlots * slot_bytes));
  KVT_ASSIGN_OR_RETURN(DeviceMemory kv, ctx.allocate(2ull * kBatch * kKvHeads * kDim * sizeof(bf16)));
  KVT_RETURN_IF_ERROR(fill_random_bf16(ctx, kv.data(), kv.bytes(), 1));
  KVT_ASSIGN_OR_RETURN(DeviceMemory slots, scattered_slot_ids(ctx, kBatch * kKvHeads, kArenaSlots, 2));
  std::vector<uint32_t> rows_host(kBatch);
  for (uint32_t b = 0; b < kBatch; ++b) rows_host[b] = (b * 37) % kChunk;
  KVT_ASSIGN_OR_RETURN(DeviceMemory rows, ctx.allocate(kBatch * sizeof(uint32_t)));
  KVT_RETURN_IF_ERROR(ctx.upload(rows.data(), rows_host.data(), kBatch * sizeof(uint32_t)));

  gpu::AppendArgs a;
  a.k = reinterpret_cast<const bf16*>(kv.data());
  a.v = a.k + uint64_t{kBatch} * kKvHeads * kDim;
  a.batch = kBatch;
  a.kv_heads = kKvHeads;
  a.arena = gpu::SlotArenaView{arena.data(), slot_bytes, kArenaSlots, kChunk, kDim};
  a.slots = reinterpret_cast<const uint32_t*>(slots.data());
  a.rows = reinterpret_cast<const uint32_t*>(rows.data());
  KVT_ASSIGN_OR_RETURN(const double ms,
                       event_ms_per_call(ctx, [&] { return gpu::append_kv(a, ctx.compute_stream()); }, 100, args));
  report.add("append_kv_b16_us", ms * 1e3, "us");
  return Status::ok_status();
}

// Summaries of 16384 full blocks of 64 x 128 (a 1M-token context of one KV
// head) into the default table (fp32 mean key and mean value): GB/s of the K
// and V bytes read.
Status add_summary_result(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args) {
  constexpr uint32_t kBlocks = 16384, kDim = 128, kChunk = 64;
  const uint64_t slot_bytes = 2ull * kChunk * kDim * sizeof(bf16);
  KVT_ASSIGN_OR_RETURN(DeviceMemory arena, ctx.allocate(kBlocks * slot_bytes));
  KVT_RETURN_IF_ERROR(fill_random_bf16(ctx, arena.data(), arena.bytes(), 3));
  KVT_ASSIGN_OR_RETURN(DeviceMemory slots, scattered_slot_ids(ctx, kBlocks, kBlocks, 4));
  const std::vector<uint32_t> tokens_host(kBlocks, kChunk);
  KVT_ASSIGN_OR_RETURN(DeviceMemory tokens, ctx.allocate(kBlocks * sizeof(uint32_t)));
  KVT_RETURN_IF_ERROR(ctx.upload(tokens.data(), tokens_host.data(), kBlocks * sizeof(uint32_t)));
  KVT_ASSIGN_OR_RETURN(DeviceMemory out, ctx.allocate(2ull * kBlocks * kDim * sizeof(float)));

  gpu::SummaryArgs s;
  s.arena = gpu::SlotArenaView{arena.data(), slot_bytes, kBlocks, kChunk, kDim};
  s.slots = reinterpret_cast<const uint32_t*>(slots.data());
  s.tokens = reinterpret_cast<const uint32_t*>(tokens.data());
  s.count = kBlocks;
  s.f32_stride = kDim;
  s.bf16_stride = kDim;
  s.kmean = reinterpret_cast<float*>(out.data());
  s.vmean = s.kmean + uint64_t{kBlocks} * kDim;
  KVT_ASSIGN_OR_RETURN(const double ms,
                       event_ms_per_call(ctx, [&] { return gpu::build_summaries(s, ctx.compute_stream()); }, 4, args));
  report.add("build_summaries_gbps", static_cast<double>(kBlocks * slot_bytes) / 1e6 / ms, "GB/s");
  report.set_config("build_summaries", "16384 scattered blocks of 64 x 128 bf16 -> fp32 mean key + mean value; "
                                       "GB/s of K and V bytes read (512 MiB)");
  return Status::ok_status();
}

}  // namespace

void add_gather_results(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args) {
  run_part(report, "gather", [&] { return add_copy_results(report, ctx.device(), args); });
  run_part(report, "append_kv", [&] { return add_append_result(report, ctx, args); });
  run_part(report, "build_summaries", [&] { return add_summary_result(report, ctx, args); });
}

}  // namespace kvtier::bench
