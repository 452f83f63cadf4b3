// The decode kernel's read-only twin for the probes in this folder (not built
// by CMake): decode_kernel's prologue and cp.async pipeline over the same
// split with no arithmetic, so its time is the memory ceiling of that split.
// Include after decode.cuh. (Until 2026-11-29 decode_split_sweep.cu had its
// own copy without the final barrier; the sweeps recorded before then used it.)
#pragma once

#include "decode.cuh"

template <int D, int G>
__global__ void __launch_bounds__(kvtier::gpu::decode_detail::kThreads, 2)
    read_kernel(const kvtier::gpu::decode_detail::DecodeParams p) {
  using namespace kvtier::gpu::decode_detail;
  using Cfg = DecodeConfig<D, G>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint32_t slot_table[kMaxSplitBlocks];
  KVT_DECODE_PROBE_MARK(0);
  const uint32_t list = blockIdx.x, split = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t begin = p.list_begin[list], end = p.list_begin[list + 1];
  const uint32_t first = split * p.blocks_per_split;
  const uint32_t blocks = first < end - begin ? min(end - begin - first, p.blocks_per_split) : 0;
  const uint32_t valid_tokens = blocks << p.chunk_shift;
  for (uint32_t i = threadIdx.x; i < blocks; i += kThreads) slot_table[i] = p.slot_ids[begin + first + i];
  __syncthreads();
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t tiles = (valid_tokens + kTileTokens - 1) / kTileTokens;
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (uint32_t(s) < tiles) issue_tile<D, G>(base + s * Cfg::kStageBytes, s, p, slot_table, valid_tokens, warp, lane);
    cp_async_commit();
  }
  float acc = 0.f;
  for (uint32_t t = 0; t < tiles; ++t) {
    __syncwarp();
    const uint32_t ahead = t + Cfg::kStages - 1;
    if (ahead < tiles)
      issue_tile<D, G>(base + (ahead % Cfg::kStages) * Cfg::kStageBytes, ahead, p, slot_table, valid_tokens, warp, lane);
    cp_async_commit();
    cp_async_wait<Cfg::kStages - 1>();
    __syncwarp();
    acc += reinterpret_cast<const float*>(smem + (t % Cfg::kStages) * Cfg::kStageBytes)[threadIdx.x];
  }
  cp_async_wait<0>();
  __syncthreads();
  KVT_DECODE_PROBE_MARK(1);
  if (acc == 12345.f) p.o[threadIdx.x] = acc;
  KVT_DECODE_PROBE_MARK(2);
}
