// Host launchers of the append and summary kernels (kernels in kv_write.cuh):
// each checks what the host can see of its arguments and returns a Status
// naming the field, launches on the caller's stream and does not wait.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kvtier/gpu/kernels.h"
#include "arena_check.h"
#include "cuda_check.h"
#include "kv_write.cuh"

namespace kvtier::gpu {
namespace {

using kv_write::Arena;
using kv_write::kThreads;

// Grid-stride kernels never need more CTAs than this to fill an H100/H200.
constexpr uint64_t kMaxCtas = 1u << 16;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Status check_arena(const char* what, const SlotArenaView& a) { return check_arena_view(what, a); }

Arena arena_of(const SlotArenaView& a) {
  return Arena{reinterpret_cast<unsigned char*>(a.base), a.slot_bytes, a.slots, a.chunk_tokens};
}

uint32_t grid_for(uint64_t threads) {
  return static_cast<uint32_t>(std::clamp<uint64_t>((threads + kThreads - 1) / kThreads, 1, kMaxCtas));
}

// Launches `kernel` with 16-byte vectors when both sources are 16-byte
// aligned (rows are 128 or 256 bytes, so then every row is), else with bf16
// elements: correct for any caller pointer, fast for the usual one.
template <class LaunchFn>
Status launch_append(const char* name, const bf16* k, const bf16* v, uint64_t rows, uint32_t head_dim,
                     LaunchFn&& launch) {
  // The kernels index bf16 elements in 32 bits: 2^31 / (2 * 128) = 8M
  // (token, head) rows per call, far above one prefill block.
  if (rows * head_dim >= (uint64_t{1} << 31)) {
    return invalid_argument(std::string(name) + ": " + std::to_string(rows) +
                            " K/V rows in one call is more than the kernel indexes; append in smaller ranges");
  }
  if (aligned16(k) && aligned16(v)) {
    launch(uint4{}, grid_for(rows * head_dim * sizeof(bf16) / 16));
  } else {
    launch(uint16_t{}, grid_for(rows * head_dim));
  }
  KVT_CUDA_RETURN_IF_LAUNCH_FAILED(name);
  return Status::ok_status();
}

}  // namespace

// ---- append_kv ---------------------------------------------------------------

Status append_kv(const AppendArgs& args, cudaStream_t stream) {
  constexpr const char* kWhat = "append_kv";
  KVT_RETURN_IF_ERROR(check_arena(kWhat, args.arena));
  if (args.batch == 0) return invalid_field(kWhat, "batch", 0, "must be at least 1");
  if (args.kv_heads == 0) return invalid_field(kWhat, "kv_heads", 0, "must be at least 1");
  KVT_RETURN_IF_ERROR(
      require_pointers(kWhat, {{"k", args.k}, {"v", args.v}, {"slots", args.slots}, {"rows", args.rows}}));
  const uint64_t rows = 2ull * args.batch * args.kv_heads;  // K and V rows
  const uint32_t row_bytes = args.arena.head_dim * sizeof(bf16);
  const Arena arena = arena_of(args.arena);
  return launch_append("append_kv", args.k, args.v, rows, args.arena.head_dim, [&](auto vec, uint32_t grid) {
    using Vec = decltype(vec);
    kv_write::append_decode_kernel<Vec><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const Vec*>(args.k), reinterpret_cast<const Vec*>(args.v), args.batch, args.kv_heads,
        arena, row_bytes, args.slots, args.rows);
  });
}

// ---- append_kv_range ----------------------------------------------------------

Status append_kv_range(const AppendRangeArgs& args, cudaStream_t stream) {
  constexpr const char* kWhat = "append_kv_range";
  KVT_RETURN_IF_ERROR(check_arena(kWhat, args.arena));
  if (args.kv_heads == 0) return invalid_field(kWhat, "kv_heads", 0, "must be at least 1");
  if (args.tokens == 0) return Status::ok_status();  // nothing to append
  KVT_RETURN_IF_ERROR(require_pointers(kWhat, {{"k", args.k}, {"v", args.v}, {"slots", args.slots}}));
  const uint64_t chunk = args.arena.chunk_tokens;
  const uint64_t c0 = args.first_token / chunk;
  const uint64_t chunks = (args.first_token + args.tokens - 1) / chunk - c0 + 1;
  const uint64_t rows = 2ull * args.tokens * args.kv_heads;
  const uint32_t row_bytes = args.arena.head_dim * sizeof(bf16);
  const Arena arena = arena_of(args.arena);
  return launch_append("append_kv_range", args.k, args.v, rows, args.arena.head_dim, [&](auto vec, uint32_t grid) {
    using Vec = decltype(vec);
    kv_write::append_range_kernel<Vec><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const Vec*>(args.k), reinterpret_cast<const Vec*>(args.v), args.tokens, args.kv_heads,
        args.first_token, static_cast<uint32_t>(chunks), arena, row_bytes, args.slots);
  });
}

// ---- build_summaries ------------------------------------------------------------

namespace {

Status check_summary_args(const SummaryArgs& args) {
  constexpr const char* kWhat = "build_summaries";
  KVT_RETURN_IF_ERROR(require_pointers(kWhat, {{"slots", args.slots}, {"tokens", args.tokens}}));
  const bool f32_out = args.kmean != nullptr || args.kmin != nullptr || args.kmax != nullptr || args.vmean != nullptr;
  if (f32_out && args.f32_stride < args.arena.head_dim)
    return invalid_field(kWhat, "f32_stride", args.f32_stride, "is below head_dim");
  if (args.kmean_bf16 != nullptr && args.bf16_stride < args.arena.head_dim)
    return invalid_field(kWhat, "bf16_stride", args.bf16_stride, "is below head_dim");
  return Status::ok_status();
}

template <int kHeadDim>
void launch_summaries(const SummaryArgs& args, cudaStream_t stream) {
  constexpr uint32_t kBlocksPerCta = kThreads / (kHeadDim / kv_write::kDimsPerLane);
  const uint32_t grid = (args.count + kBlocksPerCta - 1) / kBlocksPerCta;
  const kv_write::SummaryOutputs out{args.kmean, reinterpret_cast<__nv_bfloat16*>(args.kmean_bf16), args.kmin,
                                     args.kmax, args.vmean, args.f32_stride, args.bf16_stride};
  kv_write::summary_kernel<kHeadDim><<<grid, kThreads, 0, stream>>>(arena_of(args.arena), args.slots, args.tokens,
                                                                     args.count, out);
}

}  // namespace

Status build_summaries(const SummaryArgs& args, cudaStream_t stream) {
  KVT_RETURN_IF_ERROR(check_arena("build_summaries", args.arena));
  if (args.count == 0) return Status::ok_status();
  KVT_RETURN_IF_ERROR(check_summary_args(args));
  const bool any_out = args.kmean != nullptr || args.kmean_bf16 != nullptr || args.kmin != nullptr ||
                       args.kmax != nullptr || args.vmean != nullptr;
  if (!any_out) return Status::ok_status();
  // The one place where head_dim becomes a compile-time constant;
  // check_arena has already refused anything but 64 and 128.
  if (args.arena.head_dim == 64) {
    launch_summaries<64>(args, stream);
  } else {
    launch_summaries<128>(args, stream);
  }
  KVT_CUDA_RETURN_IF_LAUNCH_FAILED("build_summaries");
  return Status::ok_status();
}

}  // namespace kvtier::gpu
