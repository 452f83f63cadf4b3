// The decode part of `kvtier bench gpu`: sparse paged decode attention on the
// Llama-3.1-8B layer shape against the device-to-device copy bandwidth
// measured in the same run, and the merge of partial states. Uses only
// CudaContext, Event and the kernel launchers, so it builds without CUDA.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gpu_suites.h"
#include "kvtier/core/bf16.h"
#include "kvtier/gpu/kernels.h"

namespace kvtier::bench {
namespace {

// Llama-3.1-8B, one layer; the hot set of DESIGN.md section 10's default
// policy per KV head: 128 sink tokens + 4096 window + 64 selected chunks.
constexpr uint32_t kQHeads = 32, kKvHeads = 8, kHeadDim = 128, kChunkTokens = 64;
constexpr uint32_t kListBlocks = 2 + 64 + 64;
constexpr uint64_t kBlockBytes = uint64_t{2} * kChunkTokens * kHeadDim * sizeof(bf16);

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs `launch` warmup + repeats times back to back, each between its own
// pair of events, and returns the median milliseconds. The timed launches
// are queued behind a few milliseconds of copies (`head_start`, when given),
// so the host is far ahead of the device: a short kernel is timed as the
// device runs it inside a step, not at the pace the host can launch it.
Result<double> median_launch_ms(gpu::CudaContext& ctx, int warmup, int repeats,
                                const std::function<Status(int)>& launch,
                                const std::function<Status()>& head_start = nullptr) {
  const cudaStream_t stream = ctx.compute_stream();
  for (int i = 0; i < warmup; ++i) KVT_RETURN_IF_ERROR(launch(i));
  if (head_start) KVT_RETURN_IF_ERROR(head_start());
  std::vector<gpu::Event> start, stop;
  for (int i = 0; i < repeats; ++i) {
    KVT_ASSIGN_OR_RETURN(gpu::Event a, gpu::Event::create());
    KVT_ASSIGN_OR_RETURN(gpu::Event b, gpu::Event::create());
    start.push_back(std::move(a));
    stop.push_back(std::move(b));
  }
  for (int i = 0; i < repeats; ++i) {
    KVT_RETURN_IF_ERROR(start[i].record(stream));
    KVT_RETURN_IF_ERROR(launch(warmup + i));
    KVT_RETURN_IF_ERROR(stop[i].record(stream));
  }
  KVT_RETURN_IF_ERROR(ctx.synchronize(stream));
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    KVT_ASSIGN_OR_RETURN(const float t, gpu::Event::elapsed_ms(start[i], stop[i]));
    ms.push_back(t);
  }
  return median(std::move(ms));
}

// GB/s of a large device-to-device copy, counting bytes read and written:
// the ceiling for a kernel that streams memory.
Result<double> copy_gbps(gpu::CudaContext& ctx, const SuiteArgs& args) {
  const uint64_t bytes = args.quick ? (uint64_t{256} << 20) : (uint64_t{1} << 30);
  KVT_ASSIGN_OR_RETURN(DeviceMemory src, ctx.allocate(bytes));
  KVT_ASSIGN_OR_RETURN(DeviceMemory dst, ctx.allocate(bytes));
  KVT_RETURN_IF_ERROR(ctx.memset(src.data(), 1, bytes));
  KVT_ASSIGN_OR_RETURN(const double ms, median_launch_ms(ctx, 3, args.quick ? 10 : 30, [&](int) {
                         return ctx.copy_async(dst.data(), src.data(), bytes, ctx.compute_stream());
                       }));
  return 2.0 * static_cast<double>(bytes) / (ms * 1e6);
}

// The device buffers of the decode benchmark: one arena larger than L2,
// cut into disjoint sets of randomly scattered slots, one per launch in turn.
struct DecodeSetup {
  DeviceMemory arena, q, list_begin, last_tokens, slot_ids, o, lse, workspace;
  DeviceMemory scratch;  // 512 MiB for head_start copies
  uint32_t arena_slots = 0;
  uint64_t slot_id_count = 0;  // runs of equal size, one per launch in turn
  uint64_t workspace_bytes = 0;
};

Result<DecodeSetup> make_decode_setup(gpu::CudaContext& ctx, uint64_t arena_bytes, uint32_t max_batch) {
  DecodeSetup s;
  s.arena_slots = static_cast<uint32_t>(arena_bytes / kBlockBytes);
  KVT_ASSIGN_OR_RETURN(s.arena, ctx.allocate(uint64_t{s.arena_slots} * kBlockBytes));
  // bf16 0x3C3C (about 0.0115) everywhere: finite, and the values do not matter for speed.
  KVT_RETURN_IF_ERROR(ctx.memset(s.arena.data(), 0x3C, uint64_t{s.arena_slots} * kBlockBytes));
  const uint32_t lists = max_batch * kKvHeads;
  std::vector<bf16> q(size_t{max_batch} * kQHeads * kHeadDim);
  std::mt19937_64 gen(42);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (bf16& x : q) x = bf16::from_float(dist(gen));
  std::vector<uint32_t> begin(lists + 1), last(lists, kChunkTokens);
  for (uint32_t l = 0; l <= lists; ++l) begin[l] = l * kListBlocks;
  // Every slot of the arena in random order; a launch at batch b reads the
  // i-th run of b * kKvHeads * kListBlocks of them.
  std::vector<uint32_t> slots(s.arena_slots);
  std::iota(slots.begin(), slots.end(), 0u);
  std::shuffle(slots.begin(), slots.end(), gen);
  s.slot_id_count = uint64_t{s.arena_slots} / (lists * kListBlocks) * (lists * kListBlocks);
  slots.resize(s.slot_id_count);
  const auto upload = [&](DeviceMemory& mem, const void* host, uint64_t bytes) -> Status {
    KVT_ASSIGN_OR_RETURN(mem, ctx.allocate(bytes));
    return ctx.upload(mem.data(), host, bytes);
  };
  KVT_RETURN_IF_ERROR(upload(s.q, q.data(), q.size() * sizeof(bf16)));
  KVT_RETURN_IF_ERROR(upload(s.list_begin, begin.data(), begin.size() * 4));
  KVT_RETURN_IF_ERROR(upload(s.last_tokens, last.data(), last.size() * 4));
  KVT_RETURN_IF_ERROR(upload(s.slot_ids, slots.data(), slots.size() * 4));
  KVT_ASSIGN_OR_RETURN(s.o, ctx.allocate(size_t{max_batch} * kQHeads * kHeadDim * sizeof(float)));
  KVT_ASSIGN_OR_RETURN(s.lse, ctx.allocate(size_t{max_batch} * kQHeads * sizeof(float)));
  KVT_ASSIGN_OR_RETURN(s.scratch, ctx.allocate(uint64_t{512} << 20));
  return s;
}

gpu::DecodeArgs decode_args(const DecodeSetup& s, uint32_t batch) {
  gpu::DecodeArgs a;
  a.q = reinterpret_cast<const bf16*>(s.q.data());
  a.batch = batch;
  a.q_heads = kQHeads;
  a.kv_heads = kKvHeads;
  a.arena = {s.arena.data(), kBlockBytes, s.arena_slots, kChunkTokens, kHeadDim};
  a.list_begin = reinterpret_cast<const uint32_t*>(s.list_begin.data());
  a.slot_ids = reinterpret_cast<const uint32_t*>(s.slot_ids.data());
  a.last_tokens = reinterpret_cast<const uint32_t*>(s.last_tokens.data());
  a.max_list_blocks = kListBlocks;
  a.scale = 0.08838834764831845f;  // 1/sqrt(128)
  a.o = reinterpret_cast<float*>(s.o.data());
  a.lse = reinterpret_cast<float*>(s.lse.data());
  return a;
}

// Device work that keeps the device busy while the host queues `repeats`
// launches: one 256 MiB device-to-device copy (~100 us) per 8 of them.
std::function<Status()> head_start(gpu::CudaContext& ctx, DeviceMemory& scratch, int repeats) {
  return [&ctx, &scratch, repeats]() -> Status {
    const uint64_t half = scratch.bytes() / 2;
    for (int i = 0; i < repeats / 8 + 1; ++i)
      KVT_RETURN_IF_ERROR(ctx.copy_async(scratch.data() + half, scratch.data(), half, ctx.compute_stream()));
    return Status::ok_status();
  };
}

// Median milliseconds of one decode_attention call at `batch`, launch i
// reading slot set i % (sets this batch has).
Result<double> decode_ms(gpu::CudaContext& ctx, DecodeSetup& s, uint32_t batch, const SuiteArgs& args) {
  gpu::DecodeArgs a = decode_args(s, batch);
  const uint64_t ws = gpu::decode_workspace_bytes(a);
  if (ws > s.workspace_bytes) {
    KVT_ASSIGN_OR_RETURN(s.workspace, ctx.allocate(ws));
    s.workspace_bytes = ws;
  }
  const uint32_t blocks_per_set = batch * kKvHeads * kListBlocks;
  const uint32_t sets = static_cast<uint32_t>(s.slot_id_count / blocks_per_set);
  const uint32_t* slot_ids = a.slot_ids;
  const int repeats = args.quick ? 30 : 200;
  return median_launch_ms(
      ctx, 5, repeats,
      [&](int i) {
        a.slot_ids = slot_ids + uint64_t(i % sets) * blocks_per_set;
        return gpu::decode_attention(a, s.workspace.data(), s.workspace_bytes, ctx.compute_stream());
      },
      head_start(ctx, s.scratch, repeats));
}

// Median microseconds of merging a GPU and a CPU partial for batch 16 with
// bf16 output, the step's last kernel before the next layer.
Result<double> merge_us(gpu::CudaContext& ctx, DeviceMemory& scratch, const SuiteArgs& args) {
  const uint32_t rows = 16 * kQHeads, parts = 2;
  KVT_ASSIGN_OR_RETURN(DeviceMemory o_parts, ctx.allocate(uint64_t{parts} * rows * kHeadDim * 4));
  KVT_ASSIGN_OR_RETURN(DeviceMemory lse_parts, ctx.allocate(uint64_t{parts} * rows * 4));
  KVT_ASSIGN_OR_RETURN(DeviceMemory out, ctx.allocate(uint64_t{rows} * kHeadDim * 2));
  KVT_RETURN_IF_ERROR(ctx.memset(o_parts.data(), 0, o_parts.bytes()));
  KVT_RETURN_IF_ERROR(ctx.memset(lse_parts.data(), 0, lse_parts.bytes()));
  gpu::MergeArgs m;
  m.o_parts = reinterpret_cast<const float*>(o_parts.data());
  m.lse_parts = reinterpret_cast<const float*>(lse_parts.data());
  m.parts = parts;
  m.rows = rows;
  m.head_dim = kHeadDim;
  m.out_bf16 = reinterpret_cast<bf16*>(out.data());
  const int repeats = args.quick ? 30 : 200;
  KVT_ASSIGN_OR_RETURN(const double ms,
                       median_launch_ms(
                           ctx, 5, repeats, [&](int) { return gpu::merge_partials(m, ctx.compute_stream()); },
                           head_start(ctx, scratch, repeats)));
  return ms * 1e3;
}

Status add_decode(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args) {
  KVT_ASSIGN_OR_RETURN(const double copy, copy_gbps(ctx, args));
  report.add("hbm_copy_bw", copy, "GB/s");
  const uint64_t arena_bytes = args.quick ? (uint64_t{1} << 30) : (uint64_t{2} << 30);
  KVT_ASSIGN_OR_RETURN(DecodeSetup setup, make_decode_setup(ctx, arena_bytes, 16));
  report.set_config("decode_shape", "q_heads 32, kv_heads 8, head_dim 128, chunk_tokens 64, " +
                                        std::to_string(kListBlocks) +
                                        " blocks per list (2 sink + 64 window + 64 selected), full blocks");
  report.set_config("decode_slots", "scattered at random in a " + std::to_string(arena_bytes >> 20) +
                                        " MiB arena; launch i reads disjoint slot set i mod (sets for its batch), "
                                        "so every timed launch reads HBM, not L2");
  report.set_config("decode_timing", "events around each decode_attention call (kernel + split merge), "
                                     "launches queued back to back behind copies that put the host ahead of the device, median");
  double b1_ms = 0;
  for (uint32_t batch : {1u, 4u, 16u}) {
    const std::string name = "decode_sparse_b" + std::to_string(batch);
    KVT_ASSIGN_OR_RETURN(const gpu::DecodeLaunchPlan plan, gpu::decode_launch_plan(decode_args(setup, batch)));
    report.set_config(name + "_plan", std::to_string(plan.splits) + " splits of " +
                                          std::to_string(plan.blocks_per_split) + " blocks per list" +
                                          (plan.splits > 1 ? " + merge kernel" : ""));
    KVT_ASSIGN_OR_RETURN(const double ms, decode_ms(ctx, setup, batch, args));
    const double kv_bytes = static_cast<double>(batch) * kKvHeads * kListBlocks * kBlockBytes;
    report.add(name, kv_bytes / (ms * 1e6), "GB/s", "hbm_copy_bw");
    if (batch == 1) b1_ms = ms;
  }
  report.add("decode_sparse_b1_latency_us", b1_ms * 1e3, "us");
  KVT_ASSIGN_OR_RETURN(const double merge, merge_us(ctx, setup.scratch, args));
  report.add("merge_partials_b16_us", merge, "us");
  return Status::ok_status();
}

}  // namespace

void add_decode_results(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args) {
  run_part(report, "decode", [&] { return add_decode(report, ctx, args); });
}

}  // namespace kvtier::bench
