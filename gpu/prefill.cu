// prefill_attention (kernels.h): argument checks and the dispatch of head dim
// and GQA group onto the kernel instances of prefill.cuh.
#include <cmath>
#include <cstdint>
#include <string>

#include "arena_check.h"
#include "kvtier/gpu/kernels.h"
#include "prefill.cuh"

namespace kvtier::gpu {
namespace {

constexpr std::string_view kWhat = "prefill_attention";

Status null_field(std::string_view field) {
  return invalid_argument(std::string(kWhat) + ": " + std::string(field) + " is null");
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

Status check_pointers(const PrefillArgs& a) {
  if (a.q == nullptr) return null_field("q");
  if (a.arena.base == nullptr) return null_field("arena.base");
  if (a.list_begin == nullptr) return null_field("list_begin");
  if (a.slot_ids == nullptr) return null_field("slot_ids");
  if (a.block_first_pos == nullptr) return null_field("block_first_pos");
  if (a.block_tokens == nullptr) return null_field("block_tokens");
  if (a.o == nullptr && a.out_bf16 == nullptr)
    return invalid_argument(std::string(kWhat) + ": o and out_bf16 are both null; at least one output is needed");
  // The kernel moves 16-byte pieces of q and of the arena, and stores o in
  // pairs of floats and out_bf16 in pairs of bf16.
  if (!aligned(a.q, 16)) return invalid_argument(std::string(kWhat) + ": q is not 16-byte aligned");
  if (!aligned(a.arena.base, 16)) return invalid_argument(std::string(kWhat) + ": arena.base is not 16-byte aligned");
  if (!aligned(a.o, 8)) return invalid_argument(std::string(kWhat) + ": o is not 8-byte aligned");
  if (!aligned(a.out_bf16, 4)) return invalid_argument(std::string(kWhat) + ": out_bf16 is not 4-byte aligned");
  return Status::ok_status();
}

Status check_shape(const PrefillArgs& a) {
  // Query offsets are int32 inside the kernel; 2^30 leaves room for the clamp
  // of key positions (prefill.cuh kPosClamp).
  if (a.nq == 0 || a.nq >= (1u << 30)) return invalid_field(kWhat, "nq", a.nq, "must be in 1..2^30-1");
  if (a.kv_heads == 0 || a.kv_heads > 65535) return invalid_field(kWhat, "kv_heads", a.kv_heads, "must be in 1..65535");
  if (a.q_heads == 0 || a.q_heads % a.kv_heads != 0)
    return invalid_field(kWhat, "q_heads", a.q_heads, "must be a positive multiple of kv_heads=" + std::to_string(a.kv_heads));
  const uint32_t group = a.q_heads / a.kv_heads;
  if (group != 1 && group != 2 && group != 4 && group != 8)
    return invalid_field(kWhat, "q_heads / kv_heads", group, "is unsupported (supported: 1, 2, 4, 8)");
  if (a.q_first_pos >= (uint64_t{1} << 62)) return invalid_field(kWhat, "q_first_pos", a.q_first_pos, "must be < 2^62");
  if (!std::isfinite(a.scale) || a.scale <= 0.f)
    return invalid_argument(std::string(kWhat) + ": scale=" + std::to_string(a.scale) + " must be finite and > 0");
  return Status::ok_status();
}

Status check_arena(const SlotArenaView& v) { return check_arena_view(kWhat, v); }

// The one place where head dim and group become template arguments.
Status dispatch(const PrefillArgs& a, cudaStream_t stream) {
  const uint32_t group = a.q_heads / a.kv_heads;
  switch (a.arena.head_dim * 16 + group) {
    case 64 * 16 + 1: return prefill::launch_prefill<64, 1>(a, stream);
    case 64 * 16 + 2: return prefill::launch_prefill<64, 2>(a, stream);
    case 64 * 16 + 4: return prefill::launch_prefill<64, 4>(a, stream);
    case 64 * 16 + 8: return prefill::launch_prefill<64, 8>(a, stream);
    case 128 * 16 + 1: return prefill::launch_prefill<128, 1>(a, stream);
    case 128 * 16 + 2: return prefill::launch_prefill<128, 2>(a, stream);
    case 128 * 16 + 4: return prefill::launch_prefill<128, 4>(a, stream);
    case 128 * 16 + 8: return prefill::launch_prefill<128, 8>(a, stream);
    default:
      return unsupported(std::string(kWhat) + ": no kernel for head_dim=" + std::to_string(a.arena.head_dim) +
                         " group=" + std::to_string(group));
  }
}

}  // namespace

Status prefill_attention(const PrefillArgs& args, cudaStream_t stream) {
  KVT_RETURN_IF_ERROR(check_pointers(args));
  KVT_RETURN_IF_ERROR(check_shape(args));
  KVT_RETURN_IF_ERROR(check_arena(args.arena));
  return dispatch(args, stream);
}

}  // namespace kvtier::gpu
