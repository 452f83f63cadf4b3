// Sparse paged decode attention and the merge of partial states (DESIGN.md
// sections 3, 10): the merge kernel, the split-KV plan and the public entry
// points of kernels.h. The decode kernel itself is the template in
// decode.cuh, instantiated in decode_d64.cu and decode_d128.cu.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "arena_check.h"
#include "cuda_check.h"
#include "decode.cuh"
#include "kvtier/gpu/kernels.h"

namespace kvtier::gpu {
namespace decode_detail {

KVT_DECODE_CONFIGS(KVT_DECODE_EXTERN)

// ---- The merge kernel -----------------------------------------------------------

constexpr int kMergeThreads = 256;

struct MergeParams {
  const float* o_parts = nullptr;    // [parts][elements]
  const float* lse_parts = nullptr;  // [parts][rows]
  uint32_t parts = 0;
  uint32_t rows = 0;
  uint32_t head_dim = 0;
  uint32_t elements = 0;  // rows * head_dim
  float* o_out = nullptr;
  float* lse_out = nullptr;
  __nv_bfloat16* out_bf16 = nullptr;
};

// One thread per output element (row, d): consecutive threads read
// consecutive floats of every part. Each thread recomputes its row's maximum
// lse: a handful of broadcast loads, cheaper than a second pass or a barrier.
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const MergeParams p) {
  // Launched right behind decode_kernel, the parts are its results.
  wait_for_prerequisite_grid();
  const uint32_t i = blockIdx.x * kMergeThreads + threadIdx.x;
  if (i >= p.elements) return;
  const uint32_t row = i / p.head_dim;
  // Both passes are unrolled so that several parts' loads are in flight at
  // once: behind a 33-way split, one load at a time costs 33 L2 round trips.
  float m = -INFINITY;
#pragma unroll 8
  for (uint32_t k = 0; k < p.parts; ++k) m = fmaxf(m, p.lse_parts[uint64_t{k} * p.rows + row]);
  float o = 0.f;
  float lse = -INFINITY;
  // Only empty parts: keep the empty state, as (-inf) - (-inf) would be NaN.
  if (m != -INFINITY) {
    float w_sum = 0.f, acc = 0.f;
#pragma unroll 8
    for (uint32_t k = 0; k < p.parts; ++k) {
      const float w = expf(p.lse_parts[uint64_t{k} * p.rows + row] - m);
      const float o_k = p.o_parts[uint64_t{k} * p.elements + i];
      w_sum += w;
      // An empty part (weight 0) adds nothing, whatever its o holds.
      acc = w > 0.f ? fmaf(w, o_k, acc) : acc;
    }
    // w_sum >= 1: the part holding the maximum has weight exp(0) = 1.
    o = acc / w_sum;
    lse = m + logf(w_sum);
  }
  if (p.o_out != nullptr) p.o_out[i] = o;
  if (p.out_bf16 != nullptr) p.out_bf16[i] = __float2bfloat16_rn(o);
  if (p.lse_out != nullptr && i % p.head_dim == 0) p.lse_out[row] = lse;
}

// ---- Host helpers ------------------------------------------------------------------

struct DeviceFacts {
  int device = 0;
  int sm_count = 0;
  int cc_major = 0;
};

// The current device's SM count and compute capability, queried once per device.
Result<DeviceFacts> current_device_facts() {
  static std::array<std::atomic<int>, kCachedDevices> sm_cache{}, cc_cache{};
  DeviceFacts f;
  KVT_CUDA_RETURN_IF_ERROR(cudaGetDevice(&f.device));
  const bool cacheable = f.device >= 0 && f.device < kCachedDevices;
  if (cacheable && sm_cache[f.device].load(std::memory_order_relaxed) > 0) {
    f.sm_count = sm_cache[f.device].load(std::memory_order_relaxed);
    f.cc_major = cc_cache[f.device].load(std::memory_order_relaxed);
    return f;
  }
  KVT_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&f.sm_count, cudaDevAttrMultiProcessorCount, f.device));
  KVT_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&f.cc_major, cudaDevAttrComputeCapabilityMajor, f.device));
  if (cacheable) {
    cc_cache[f.device].store(f.cc_major, std::memory_order_relaxed);
    sm_cache[f.device].store(f.sm_count, std::memory_order_relaxed);
  }
  return f;
}

// Calls f(integral_constant<int, D>, integral_constant<int, G>) for a
// supported head dim and group; anything else is an invalid_argument.
template <class F>
auto dispatch_decode(uint32_t head_dim, uint32_t group, F&& f)
    -> decltype(f(std::integral_constant<int, 64>{}, std::integral_constant<int, 1>{})) {
#define KVT_DECODE_CASE(D, G) \
  if (head_dim == (D) && group == (G)) return f(std::integral_constant<int, D>{}, std::integral_constant<int, G>{});
  KVT_DECODE_CONFIGS(KVT_DECODE_CASE)
#undef KVT_DECODE_CASE
  if (head_dim != 64 && head_dim != 128)
    return invalid_field("decode_attention", "arena.head_dim", head_dim, "is unsupported (supported: 64, 128)");
  return invalid_field("decode_attention", "q_heads / kv_heads", group,
                       "is an unsupported GQA group (supported: 1, 2, 4, 8)");
}

Status check_decode_pointers(const DecodeArgs& a) {
  KVT_RETURN_IF_ERROR(require_pointers("decode_attention", {{"q", a.q},
                                                            {"arena.base", a.arena.base},
                                                            {"list_begin", a.list_begin},
                                                            {"slot_ids", a.slot_ids},
                                                            {"last_tokens", a.last_tokens},
                                                            {"o", a.o},
                                                            {"lse", a.lse}}));
  // 16-byte vector loads of q rows (the arena's alignment is checked with its shape).
  if (reinterpret_cast<uintptr_t>(a.q) % 16 != 0)
    return invalid_argument("decode_attention: q is not 16-byte aligned; allocate it with cudaMalloc");
  return Status::ok_status();
}

Status check_decode_shape(const DecodeArgs& a) {
  constexpr const char* kWhat = "decode_attention";
  if (a.batch == 0) return invalid_field(kWhat, "batch", a.batch, "must be at least 1");
  KVT_RETURN_IF_ERROR(check_gqa_heads(kWhat, a.q_heads, a.kv_heads));
  const SlotArenaView& ar = a.arena;
  KVT_RETURN_IF_ERROR(check_arena_view(kWhat, ar));
  const uint64_t lists = uint64_t{a.batch} * a.kv_heads;
  if (lists > uint64_t{std::numeric_limits<int32_t>::max()} ||
      uint64_t{a.batch} * a.q_heads * ar.head_dim > std::numeric_limits<uint32_t>::max())
    return invalid_field(kWhat, "batch", a.batch, "makes too many lists or outputs for one launch");
  if (!std::isfinite(a.scale)) return invalid_argument("decode_attention: scale is not finite");
  return Status::ok_status();
}

// How the lists are cut into splits (grid.y) and the workspace that needs:
// the splits' o [splits][rows][D], then their lse [splits][rows].
struct DecodePlan {
  int device = 0;
  int cc_major = 0;
  uint32_t splits = 1;
  uint32_t blocks_per_split = 1;
  uint64_t workspace_bytes = 0;
};

// About one CTA per SM: with 64 KiB in flight a CTA nearly saturates its
// SM's share of memory bandwidth, and on the H200 one CTA per SM beat two
// (and beat 1.2-1.9, where some SMs hold two) at batch 1, 4 and 16. Splits
// hold whole 64-token tiles where blocks are smaller than a tile, and at
// most kMaxSplitBlocks blocks (a split's slot table).
Result<DecodePlan> plan_decode(const DecodeArgs& a) {
  KVT_RETURN_IF_ERROR(check_decode_shape(a));
  KVT_ASSIGN_OR_RETURN(const DeviceFacts facts, current_device_facts());
  const uint32_t head_dim = a.arena.head_dim, group = a.q_heads / a.kv_heads;
  // Also allows the kernel's shared memory on this device, before any launch.
  KVT_RETURN_IF_ERROR(dispatch_decode(head_dim, group, [&](auto d, auto g) {
                        return decode_ctas_per_sm<decltype(d)::value, decltype(g)::value>(facts.device);
                      }).status());
  const uint64_t lists = uint64_t{a.batch} * a.kv_heads;
  const uint32_t granule = std::max(1u, static_cast<uint32_t>(kTileTokens) / a.arena.chunk_tokens);
  const uint32_t granules = (a.max_list_blocks + granule - 1) / granule;
  const uint64_t want = std::min<uint64_t>(std::max<uint64_t>(1, uint64_t(facts.sm_count) / lists), std::max(granules, 1u));
  const uint64_t per_split = (granules + want - 1) / want * granule;
  const uint32_t blocks_per_split = static_cast<uint32_t>(std::clamp<uint64_t>(per_split, granule, kMaxSplitBlocks));
  const uint64_t splits = std::max<uint64_t>(1, (uint64_t{a.max_list_blocks} + blocks_per_split - 1) / blocks_per_split);
  if (splits > 65535)
    return invalid_field("decode_attention", "max_list_blocks", a.max_list_blocks,
                         "needs more than 65535 splits of " + std::to_string(blocks_per_split) + " blocks");
  DecodePlan plan;
  plan.device = facts.device;
  plan.cc_major = facts.cc_major;
  plan.splits = static_cast<uint32_t>(splits);
  plan.blocks_per_split = blocks_per_split;
  const uint64_t rows = uint64_t{a.batch} * a.q_heads;
  if (plan.splits > 1) plan.workspace_bytes = splits * rows * (head_dim + 1) * sizeof(float);
  return plan;
}

// Launches merge_kernel; behind decode_kernel it may start early
// (programmatic dependent launch, sm_90+) and waits in-kernel for the parts.
Status launch_merge(const MergeParams& p, bool behind_decode, int cc_major, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((p.elements + kMergeThreads - 1) / kMergeThreads);
  cfg.blockDim = dim3(kMergeThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  if (behind_decode && cc_major >= 9) {
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  const cudaError_t err = cudaLaunchKernelEx(&cfg, merge_kernel, p);
  if (err != cudaSuccess) return cuda_failure("launch of merge_kernel", err);
  KVT_CUDA_RETURN_IF_LAUNCH_FAILED("merge_kernel");
  return Status::ok_status();
}

DecodeParams decode_params(const DecodeArgs& a, const DecodePlan& plan, void* workspace) {
  DecodeParams p;
  p.q = reinterpret_cast<const uint16_t*>(a.q);
  p.arena = a.arena.base;
  p.slot_bytes = a.arena.slot_bytes;
  p.arena_slots = a.arena.slots;
  p.chunk_tokens = a.arena.chunk_tokens;
  p.chunk_shift = static_cast<uint32_t>(__builtin_ctz(a.arena.chunk_tokens));
  p.list_begin = a.list_begin;
  p.slot_ids = a.slot_ids;
  p.last_tokens = a.last_tokens;
  p.blocks_per_split = plan.blocks_per_split;
  p.scale_log2 = a.scale * kLog2e;
  const uint64_t rows = uint64_t{a.batch} * a.q_heads;
  if (plan.splits == 1) {
    p.o = a.o;
    p.lse = a.lse;
  } else {
    p.o = static_cast<float*>(workspace);
    p.lse = p.o + plan.splits * rows * a.arena.head_dim;
    p.o_split_stride = rows * a.arena.head_dim;
    p.lse_split_stride = rows;
  }
  return p;
}

}  // namespace decode_detail

using namespace decode_detail;

Result<DecodeLaunchPlan> decode_launch_plan(const DecodeArgs& args) {
  KVT_ASSIGN_OR_RETURN(const DecodePlan plan, plan_decode(args));
  return DecodeLaunchPlan{plan.splits, plan.blocks_per_split, plan.workspace_bytes};
}

uint64_t decode_workspace_bytes(const DecodeArgs& args) {
  const Result<DecodePlan> plan = plan_decode(args);
  return plan.ok() ? plan->workspace_bytes : 0;
}

Status decode_attention(const DecodeArgs& args, void* workspace, uint64_t workspace_bytes, cudaStream_t stream) {
  KVT_RETURN_IF_ERROR(check_decode_pointers(args));
  KVT_ASSIGN_OR_RETURN(const DecodePlan plan, plan_decode(args));
  if (workspace_bytes < plan.workspace_bytes)
    return invalid_field("decode_attention", "workspace_bytes", workspace_bytes,
                         "is too small: these arguments need " + std::to_string(plan.workspace_bytes) +
                             " (decode_workspace_bytes)");
  if (plan.workspace_bytes > 0 && workspace == nullptr)
    return invalid_argument("decode_attention: workspace is null but these arguments need " +
                            std::to_string(plan.workspace_bytes) + " bytes of it (decode_workspace_bytes)");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return invalid_argument("decode_attention: workspace is not 16-byte aligned; allocate it with cudaMalloc");
  const DecodeParams params = decode_params(args, plan, workspace);
  const uint32_t lists = args.batch * args.kv_heads;
  KVT_RETURN_IF_ERROR(dispatch_decode(args.arena.head_dim, args.q_heads / args.kv_heads, [&](auto d, auto g) {
    return launch_decode_kernel<decltype(d)::value, decltype(g)::value>(params, lists, plan.splits, stream);
  }));
  if (plan.splits == 1) return Status::ok_status();
  MergeParams m;
  m.o_parts = params.o;
  m.lse_parts = params.lse;
  m.parts = plan.splits;
  m.rows = args.batch * args.q_heads;
  m.head_dim = args.arena.head_dim;
  m.elements = m.rows * m.head_dim;
  m.o_out = args.o;
  m.lse_out = args.lse;
  return launch_merge(m, /*behind_decode=*/true, plan.cc_major, stream);
}

namespace {

// True when [a, a + a_bytes) and [b, b + b_bytes) share a byte.
bool overlaps(const void* a, uint64_t a_bytes, const void* b, uint64_t b_bytes) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return a != nullptr && b != nullptr && x < y + b_bytes && y < x + a_bytes;
}

Status check_merge_args(const MergeArgs& a) {
  constexpr const char* kWhat = "merge_partials";
  KVT_RETURN_IF_ERROR(require_pointers(kWhat, {{"o_parts", a.o_parts}, {"lse_parts", a.lse_parts}}));
  if (a.o_out == nullptr && a.lse_out == nullptr && a.out_bf16 == nullptr)
    return invalid_argument("merge_partials: o_out, lse_out and out_bf16 are all null; nothing to write");
  if (a.parts == 0) return invalid_field(kWhat, "parts", a.parts, "must be at least 1");
  if (a.head_dim == 0) return invalid_field(kWhat, "head_dim", a.head_dim, "must be at least 1");
  const uint64_t elements = uint64_t{a.rows} * a.head_dim;
  if (elements > std::numeric_limits<uint32_t>::max() - kMergeThreads)
    return invalid_field(kWhat, "rows", a.rows, "times head_dim exceeds 2^32 elements");
  const uint64_t in_o = elements * a.parts * 4, in_lse = uint64_t{a.rows} * a.parts * 4;
  const auto clashes = [&](const void* out, uint64_t out_bytes) {
    return overlaps(out, out_bytes, a.o_parts, in_o) || overlaps(out, out_bytes, a.lse_parts, in_lse);
  };
  if (clashes(a.o_out, elements * 4) || clashes(a.lse_out, uint64_t{a.rows} * 4) || clashes(a.out_bf16, elements * 2))
    return invalid_argument("merge_partials: an output overlaps o_parts or lse_parts");
  return Status::ok_status();
}

}  // namespace

Status merge_partials(const MergeArgs& args, cudaStream_t stream) {
  KVT_RETURN_IF_ERROR(check_merge_args(args));
  if (args.rows == 0) return Status::ok_status();
  MergeParams m;
  m.o_parts = args.o_parts;
  m.lse_parts = args.lse_parts;
  m.parts = args.parts;
  m.rows = args.rows;
  m.head_dim = args.head_dim;
  m.elements = args.rows * args.head_dim;
  m.o_out = args.o_out;
  m.lse_out = args.lse_out;
  m.out_bf16 = reinterpret_cast<__nv_bfloat16*>(args.out_bf16);
  return launch_merge(m, /*behind_decode=*/false, /*cc_major=*/0, stream);
}

}  // namespace kvtier::gpu
