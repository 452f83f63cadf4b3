// Per-CTA timeline of the decode kernel (not built by CMake; a probe). For
// batch 1, 4 and 16 on the `kvtier bench gpu` decode shape at the planned
// splits, records when each CTA of decode_kernel<128, 4> starts, finishes
// its main loop, has exchanged its warps' states and ends (%globaltimer, ns) and on which SM, for one launch
// on an idle GPU after warm-up launches; and the same for a read-only twin
// (the same cp.async pipeline, no arithmetic). Prints JSON. Build and run on
// a GPU host from the repository root, after building build-gpu:
//   nvcc -O3 -arch=sm_90 -std=c++20 -Igpu -Igpu/include -Iruntime/core/include \
//     bench/probes/decode_timeline.cu build-gpu/lib/libkvtier_core.a -o /tmp/timeline && /tmp/timeline
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

constexpr int kMaxCtas = 8192;
__device__ unsigned long long g_marks[kMaxCtas][5];  // start, loop done, end, warp states exchanged, SM id

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned sm_id() {
  unsigned r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return r;
}
#define KVT_DECODE_PROBE_MARK(mark)                                   \
  do {                                                                \
    if (threadIdx.x == 0) {                                           \
      const unsigned cta = blockIdx.y * gridDim.x + blockIdx.x;       \
      g_marks[cta][mark] = global_ns();                               \
      if ((mark) == 0) g_marks[cta][4] = sm_id();                     \
    }                                                                 \
  } while (0)

#include "decode.cuh"
#include "decode_read_twin.cuh"

using namespace kvtier::gpu::decode_detail;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1);} } while (0)

constexpr uint32_t QH = 32, KVH = 8, HD = 128, CT = 64, LB = 130;
constexpr uint64_t BB = 2ull * CT * HD * 2;


int main() {
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const uint64_t arena_bytes = 2ull << 30;
  const uint32_t slots_total = arena_bytes / BB;
  std::byte* arena;
  CK(cudaMalloc(&arena, arena_bytes));
  CK(cudaMemset(arena, 0x3C, arena_bytes));
  const uint32_t maxb = 16, lists = maxb * KVH;
  std::vector<uint16_t> q(maxb * QH * HD);
  std::mt19937_64 gen(42);
  for (auto& x : q) x = 0x3C00 + (gen() & 0xff);
  std::vector<uint32_t> begin(lists + 1), last(lists, CT);
  for (uint32_t l = 0; l <= lists; ++l) begin[l] = l * LB;
  std::vector<uint32_t> slots(slots_total);
  std::iota(slots.begin(), slots.end(), 0u);
  std::shuffle(slots.begin(), slots.end(), gen);
  uint16_t* dq; uint32_t *dbegin, *dlast, *dslots; float* ws;
  CK(cudaMalloc(&dq, q.size() * 2)); CK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dbegin, begin.size() * 4)); CK(cudaMemcpy(dbegin, begin.data(), begin.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dlast, last.size() * 4)); CK(cudaMemcpy(dlast, last.data(), last.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dslots, slots.size() * 4ull)); CK(cudaMemcpy(dslots, slots.data(), slots.size() * 4ull, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&ws, 140ull * maxb * QH * (HD + 1) * 4));
  using Cfg = DecodeConfig<128, 4>;
  auto ctas = decode_ctas_per_sm<128, 4>(0);
  if (!ctas.ok()) { fprintf(stderr, "%s\n", ctas.status().to_string().c_str()); return 1; }
  CK(cudaFuncSetAttribute(read_kernel<128, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  printf("{\"runs\": [\n");
  bool first_run = true;
  for (uint32_t batch : {1u, 4u, 16u}) {
    const uint32_t nl = batch * KVH, rows = batch * QH;
    const uint32_t bps = batch == 1 ? 9u : batch == 4 ? 33u : 130u;
    const uint32_t splits = (LB + bps - 1) / bps;
    DecodeParams p;
    p.q = dq; p.arena = arena; p.slot_bytes = BB; p.arena_slots = slots_total; p.chunk_tokens = CT; p.chunk_shift = 6;
    p.list_begin = dbegin; p.last_tokens = dlast; p.blocks_per_split = bps; p.scale_log2 = 0.0883883f * kLog2e;
    p.o = ws; p.lse = ws + uint64_t{splits} * rows * HD; p.o_split_stride = rows * HD; p.lse_split_stride = rows;
    const uint32_t per_set = nl * LB, sets = slots_total / per_set;
    for (int kind = 0; kind < 2; ++kind) {
      for (int rep = 0; rep < 3; ++rep) {
        for (int i = 0; i < 12; ++i) {  // warm-up; the last launch is recorded, each reads its own slot set
          p.slot_ids = dslots + uint64_t((rep * 12 + i) % sets) * per_set;
          if (kind == 0) {
            auto r = launch_decode_kernel<128, 4>(p, nl, splits, st);
            if (!r.ok()) { fprintf(stderr, "%s\n", r.to_string().c_str()); return 1; }
          } else {
            read_kernel<128, 4><<<dim3(nl, splits), kThreads, Cfg::kSmemBytes, st>>>(p);
          }
          CK(cudaGetLastError());
          CK(cudaStreamSynchronize(st));
        }
        std::vector<unsigned long long> marks(size_t(nl) * splits * 5);
        CK(cudaMemcpyFromSymbol(marks.data(), g_marks, marks.size() * 8));
        unsigned long long t0 = ~0ull;
        for (size_t c = 0; c < size_t(nl) * splits; ++c) t0 = std::min(t0, marks[c * 5]);
        printf("%s{\"kind\": \"%s\", \"batch\": %u, \"bps\": %u, \"rep\": %d, \"ctas\": [", first_run ? "" : ",\n",
               kind == 0 ? "kernel" : "read", batch, bps, rep);
        for (size_t c = 0; c < size_t(nl) * splits; ++c)
          printf("%s[%llu, %llu, %llu, %llu, %llu]", c ? "," : "", marks[c * 5 + 4], marks[c * 5] - t0,
                 marks[c * 5 + 1] - t0, marks[c * 5 + 2] - t0, kind == 0 ? marks[c * 5 + 3] - t0 : 0ull);
        printf("]}");
        first_run = false;
      }
    }
  }
  printf("\n]}\n");
  return 0;
}
