// Does balancing work across SMs at run time pay for the decode kernel? (Not
// built by CMake; a probe for issue 5.) On the `kvtier bench gpu` decode shape
// (batch 1, 4, 16; 130 blocks of 64 tokens per list, head dim 128), times:
//   static  - the read-only twin of decode_kernel over the planned splits
//             (one CTA per (list, split): the slowest SM sets the end);
//   dynamic - persistent CTAs, one or two per SM, taking units of U tiles
//             from one counter in list order and streaming them through the
//             same cp.async pipeline without a break between units; the next
//             units' ids and slot indices are fetched ahead, behind one CTA
//             barrier per unit;
//   kernel  - the library's decode_kernel over the planned splits (no merge).
// No arithmetic in the read kernels: their time is the memory ceiling of each
// way of handing out the work. Prints JSON. Build and run on a GPU host from
// the repository root, after building build-gpu:
//   nvcc -O3 -arch=sm_90 -std=c++20 -Igpu -Igpu/include -Iruntime/core/include \
//     bench/probes/decode_dynamic_read.cu build-gpu/lib/libkvtier_core.a -o /tmp/dyn && /tmp/dyn
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "decode.cuh"
#include "decode_read_twin.cuh"

using namespace kvtier::gpu::decode_detail;
#define CK(x)                                                                                         \
  do {                                                                                                \
    cudaError_t e = (x);                                                                              \
    if (e != cudaSuccess) {                                                                           \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));               \
      exit(1);                                                                                        \
    }                                                                                                 \
  } while (0)

constexpr uint32_t QH = 32, KVH = 8, HD = 128, CT = 64, LB = 130;
constexpr uint64_t BB = 2ull * CT * HD * 2;
constexpr uint32_t kEnd = 0xffffffffu;

// Units of U tiles (chunk_tokens 64 here: one block per tile). Unit u is tiles
// (u % upl) * U.. of list u / upl; units past a list's end are empty.
template <int D, int G, int U>
__global__ void __launch_bounds__(kThreads, 1)
    dynamic_read_kernel(const DecodeParams p, uint32_t upl, uint32_t total_units, unsigned* counter) {
  using Cfg = DecodeConfig<D, G>;
  constexpr int S = Cfg::kStages;
  constexpr int A = 2 + (S - 2) / U;  // at unit k's barrier: ids known to k + A, slots to k + A - 1
  constexpr int R = A + 2;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint32_t unit_ring[R];
  __shared__ uint32_t slot_ring[R][U];
  __shared__ uint32_t valid_ring[R];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto fill = [&](uint32_t k) {  // warp 0: unit k's slots and valid tokens
    const uint32_t e = k % R, u = unit_ring[e];
    if (u >= total_units) {
      if (lane == 0) valid_ring[e] = kEnd;
      return;
    }
    const uint32_t list = u / upl, first = (u % upl) * U;
    const uint32_t begin = p.list_begin[list], len = p.list_begin[list + 1] - begin;
    const uint32_t blocks = first < len ? min(len - first, uint32_t(U)) : 0u;
    if (lane < blocks) slot_ring[e][lane] = p.slot_ids[begin + first + lane];
    if (lane == 0) valid_ring[e] = blocks << p.chunk_shift;
  };
  if (threadIdx.x == 0)
    for (int k = 0; k <= A; ++k) unit_ring[k] = atomicAdd(counter, 1u);
  __syncthreads();
  if (warp == 0)
    for (int k = 0; k < A; ++k) fill(k);
  __syncthreads();
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const auto issue = [&](uint32_t i) {
    const uint32_t e = (i / U) % R;
    const uint32_t valid = valid_ring[e] == kEnd ? 0u : valid_ring[e];
    if (valid > 0) issue_tile<D, G>(base + (i % S) * Cfg::kStageBytes, i % U, p, slot_ring[e], valid, warp, lane);
  };
  for (int s = 0; s < S - 1; ++s) {
    issue(s);
    cp_async_commit();
  }
  float acc = 0.f;
  for (uint32_t t = 0;; ++t) {
    if (t % U == 0) {
      const uint32_t k = t / U;
      __syncthreads();
      if (valid_ring[k % R] == kEnd) break;
      if (threadIdx.x == 0) unit_ring[(k + A + 1) % R] = atomicAdd(counter, 1u);
      if (warp == 0) fill(k + A);
    }
    __syncwarp();
    issue(t + S - 1);
    cp_async_commit();
    cp_async_wait<S - 1>();
    __syncwarp();
    acc += reinterpret_cast<const float*>(smem + (t % S) * Cfg::kStageBytes)[threadIdx.x];
  }
  cp_async_wait<0>();
  if (acc == 12345.f) p.o[threadIdx.x] = acc;
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::byte* g_scratch;

template <class F>
double time_us(cudaStream_t st, int reps, F launch) {
  for (int i = 0; i < 5; ++i) launch(i);
  for (int i = 0; i < reps / 8 + 1; ++i)
    CK(cudaMemcpyAsync(g_scratch + (256ull << 20), g_scratch, 256ull << 20, cudaMemcpyDeviceToDevice, st));
  std::vector<cudaEvent_t> a(reps), b(reps);
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventCreate(&a[i]));
    CK(cudaEventCreate(&b[i]));
  }
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a[i], st));
    launch(5 + i);
    CK(cudaEventRecord(b[i], st));
  }
  CK(cudaStreamSynchronize(st));
  CK(cudaGetLastError());
  std::vector<double> v;
  for (int i = 0; i < reps; ++i) {
    float ms;
    CK(cudaEventElapsedTime(&ms, a[i], b[i]));
    v.push_back(ms * 1e3);
    CK(cudaEventDestroy(a[i]));
    CK(cudaEventDestroy(b[i]));
  }
  return median(v);
}

int main() {
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const uint64_t arena_bytes = 2ull << 30;
  const uint32_t slots_total = arena_bytes / BB;
  std::byte* arena;
  CK(cudaMalloc(&arena, arena_bytes));
  CK(cudaMemset(arena, 0x3C, arena_bytes));
  CK(cudaMalloc(&g_scratch, 512ull << 20));
  const uint32_t maxb = 16, lists = maxb * KVH;
  std::vector<uint16_t> q(maxb * QH * HD);
  std::mt19937_64 gen(42);
  for (auto& x : q) x = 0x3C00 + (gen() & 0xff);
  std::vector<uint32_t> begin(lists + 1), last(lists, CT);
  for (uint32_t l = 0; l <= lists; ++l) begin[l] = l * LB;
  std::vector<uint32_t> slots(slots_total);
  std::iota(slots.begin(), slots.end(), 0u);
  std::shuffle(slots.begin(), slots.end(), gen);
  uint16_t* dq;
  uint32_t *dbegin, *dlast, *dslots;
  float* ws;
  unsigned* counters;
  constexpr int kReps = 200, kLaunches = kReps + 5;
  CK(cudaMalloc(&dq, q.size() * 2));
  CK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dbegin, begin.size() * 4));
  CK(cudaMemcpy(dbegin, begin.data(), begin.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dlast, last.size() * 4));
  CK(cudaMemcpy(dlast, last.data(), last.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dslots, slots.size() * 4ull));
  CK(cudaMemcpy(dslots, slots.data(), slots.size() * 4ull, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&ws, 140ull * maxb * QH * (HD + 1) * 4));
  CK(cudaMalloc(&counters, kLaunches * 4));
  using Cfg = DecodeConfig<128, 4>;
  auto ctas = decode_ctas_per_sm<128, 4>(0);
  if (!ctas.ok()) {
    fprintf(stderr, "%s\n", ctas.status().to_string().c_str());
    return 1;
  }
  CK(cudaFuncSetAttribute(read_kernel<128, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  // 120 KiB of dynamic shared memory: one CTA per SM whatever the scheduler prefers.
  constexpr uint32_t kOneCtaSmem = 120u << 10;
  CK(cudaFuncSetAttribute(dynamic_read_kernel<128, 4, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, kOneCtaSmem));
  CK(cudaFuncSetAttribute(dynamic_read_kernel<128, 4, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, kOneCtaSmem));
  CK(cudaFuncSetAttribute(dynamic_read_kernel<128, 4, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, kOneCtaSmem));
  printf("{\"sms\": %d, \"rows\": [\n", sms);
  bool first = true;
  for (uint32_t batch : {1u, 4u, 16u}) {
    const uint32_t nl = batch * KVH, rows = batch * QH;
    const uint32_t bps = batch == 1 ? 9u : batch == 4 ? 33u : 130u;
    const uint32_t splits = (LB + bps - 1) / bps;
    DecodeParams p;
    p.q = dq;
    p.arena = arena;
    p.slot_bytes = BB;
    p.arena_slots = slots_total;
    p.chunk_tokens = CT;
    p.chunk_shift = 6;
    p.list_begin = dbegin;
    p.last_tokens = dlast;
    p.blocks_per_split = bps;
    p.scale_log2 = 0.0883883f * kLog2e;
    p.o = ws;
    p.lse = ws + uint64_t{splits} * rows * HD;
    p.o_split_stride = rows * HD;
    p.lse_split_stride = rows;
    const uint32_t per_set = nl * LB, sets = slots_total / per_set;
    const auto set_ids = [&](int i) { p.slot_ids = dslots + uint64_t(i % sets) * per_set; };
    const double kern = time_us(st, kReps, [&](int i) {
      set_ids(i);
      const auto r = launch_decode_kernel<128, 4>(p, nl, splits, st);
      if (!r.ok()) {
        fprintf(stderr, "%s\n", r.to_string().c_str());
        exit(1);
      }
    });
    const double rd = time_us(st, kReps, [&](int i) {
      set_ids(i);
      read_kernel<128, 4><<<dim3(nl, splits), kThreads, Cfg::kSmemBytes, st>>>(p);
    });
    const double gb = double(batch) * KVH * LB * BB / 1e3;
    printf("%s{\"batch\": %u, \"what\": \"kernel_static\", \"us\": %.2f, \"gbps\": %.0f}", first ? "" : ",\n", batch,
           kern, gb / kern);
    printf(",\n{\"batch\": %u, \"what\": \"read_static\", \"ctas\": %u, \"us\": %.2f, \"gbps\": %.0f}", batch,
           nl * splits, rd, gb / rd);
    first = false;
    const auto dyn = [&](auto u_const, uint32_t grid) {
      constexpr int U = decltype(u_const)::value;
      const uint32_t upl = (LB + U - 1) / U;
      CK(cudaMemsetAsync(counters, 0, kLaunches * 4, st));
      const double us = time_us(st, kReps, [&](int i) {
        set_ids(i);
        dynamic_read_kernel<128, 4, U><<<grid, kThreads, kOneCtaSmem, st>>>(p, upl, upl * nl, counters + i);
      });
      printf(",\n{\"batch\": %u, \"what\": \"read_dynamic\", \"unit_tiles\": %d, \"ctas\": %u, \"us\": %.2f, "
             "\"gbps\": %.0f}",
             batch, U, grid, us, gb / us);
    };
    dyn(std::integral_constant<int, 1>{}, sms);
    dyn(std::integral_constant<int, 2>{}, sms);
    dyn(std::integral_constant<int, 4>{}, sms);
  }
  printf("\n]}\n");
  return 0;
}
