// Split-plan sweep of the decode kernel (not built by CMake; a probe behind
// the plan in gpu/decode.cu). For batch 1, 4 and 16 on the Llama-3.1-8B
// decode shape of `kvtier bench gpu`, times decode_kernel<128, 4> alone (no
// merge) at each blocks-per-split, and a read-only twin that moves the same
// bytes through the same cp.async pipeline with no arithmetic: the memory
// ceiling of that split. Prints JSON. Build and run on a GPU host from the
// repository root, after building build-gpu:
//   nvcc -O3 -arch=sm_90 -std=c++20 -Igpu -Igpu/include -Iruntime/core/include \
//     bench/probes/decode_split_sweep.cu build-gpu/lib/libkvtier_core.a -o /tmp/sweep && /tmp/sweep
// Add -DKVT_DECODE_STAGES_D128=N to try another pipeline depth, and the
// argument "plan" to time only the planned splits.
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <algorithm>
#include <numeric>
#include <string>
#include "decode.cuh"
#include "decode_read_twin.cuh"

using namespace kvtier::gpu::decode_detail;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1);} } while (0)

constexpr uint32_t QH = 32, KVH = 8, HD = 128, CT = 64, LB = 130;
constexpr uint64_t BB = 2ull * CT * HD * 2;


struct Setup { std::byte* arena; uint32_t slots; uint16_t* q; uint32_t* begin; uint32_t* last; uint32_t* scat; float* o; float* lse; float* ws; std::byte* scratch; uint64_t scat_count; };
static double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

template <class F>
double time_us(cudaStream_t st, Setup& s, int reps, F launch) {
  for (int i = 0; i < 5; ++i) launch(i);
  for (int i = 0; i < reps / 8 + 1; ++i) CK(cudaMemcpyAsync(s.scratch + (256ull << 20), s.scratch, 256ull << 20, cudaMemcpyDeviceToDevice, st));
  std::vector<cudaEvent_t> a(reps), b(reps);
  for (int i = 0; i < reps; ++i) { CK(cudaEventCreate(&a[i])); CK(cudaEventCreate(&b[i])); }
  for (int i = 0; i < reps; ++i) { CK(cudaEventRecord(a[i], st)); launch(5 + i); CK(cudaEventRecord(b[i], st)); }
  CK(cudaStreamSynchronize(st));
  std::vector<double> v;
  for (int i = 0; i < reps; ++i) { float ms; CK(cudaEventElapsedTime(&ms, a[i], b[i])); v.push_back(ms * 1e3); CK(cudaEventDestroy(a[i])); CK(cudaEventDestroy(b[i])); }
  return median(v);
}

int main(int argc, char** argv) {
  const bool ncu = argc > 1 && std::string(argv[1]) == "ncu";
  // "plan": only the splits gpu/decode.cu plans on a 132-SM H200 (9, 33 and
  // 130 blocks per split at batch 1, 4 and 16), for a pipeline-depth sweep.
  const bool plan_only = argc > 1 && std::string(argv[1]) == "plan";
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  Setup s{};
  const uint64_t arena_bytes = 2ull << 30;
  s.slots = arena_bytes / BB;
  CK(cudaMalloc(&s.arena, arena_bytes)); CK(cudaMemset(s.arena, 0x3C, arena_bytes));
  CK(cudaMalloc(&s.scratch, 512ull << 20));
  const uint32_t maxb = 16, lists = maxb * KVH;
  std::vector<uint16_t> q(maxb * QH * HD); std::mt19937_64 gen(42);
  for (auto& x : q) x = 0x3C00 + (gen() & 0xff);
  std::vector<uint32_t> begin(lists + 1), last(lists, CT);
  for (uint32_t l = 0; l <= lists; ++l) begin[l] = l * LB;
  std::vector<uint32_t> slots(s.slots); std::iota(slots.begin(), slots.end(), 0u); std::shuffle(slots.begin(), slots.end(), gen);
  s.scat_count = uint64_t{s.slots} / (lists * LB) * (lists * LB);
  CK(cudaMalloc(&s.q, q.size() * 2)); CK(cudaMemcpy(s.q, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&s.begin, begin.size() * 4)); CK(cudaMemcpy(s.begin, begin.data(), begin.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&s.last, last.size() * 4)); CK(cudaMemcpy(s.last, last.data(), last.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&s.scat, s.slots * 4ull)); CK(cudaMemcpy(s.scat, slots.data(), s.slots * 4ull, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&s.o, maxb * QH * HD * 4)); CK(cudaMalloc(&s.lse, maxb * QH * 4));
  CK(cudaMalloc(&s.ws, 140ull * maxb * QH * (HD + 1) * 4));
  using Cfg = DecodeConfig<128, 4>;
  auto ctas = decode_ctas_per_sm<128, 4>(0);
  if (!ctas.ok()) { fprintf(stderr, "%s\n", ctas.status().to_string().c_str()); return 1; }
  CK(cudaFuncSetAttribute(read_kernel<128, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  printf("{\"stages_d128\": %d, \"ctas_per_sm\": %d,\n\"rows\": [\n", Cfg::kStages, *ctas);
  const int reps = ncu ? 1 : 200;
  bool firstrow = true;
  for (uint32_t batch : {1u, 4u, 16u}) {
    const uint32_t nl = batch * KVH, rows = batch * QH;
    for (uint32_t bps : {4u, 5u, 6u, 8u, 9u, 10u, 11u, 13u, 15u, 17u, 19u, 22u, 26u, 33u, 34u, 44u, 65u, 130u}) {
      const uint32_t splits = (LB + bps - 1) / bps;
      if (uint64_t(splits) * nl > 4 * 264 || uint64_t(splits) * nl < 64) continue;
      if (ncu && !(batch == 4 && bps == 33)) continue;  // "ncu": one config, for a profiler
      // The library's plan (gpu/decode.cu plan_decode) on 132 SMs, for any tile size.
      const uint32_t granule = std::max(1u, uint32_t(kTileTokens) / CT), granules = (LB + granule - 1) / granule;
      const uint32_t want = std::min(std::max(1u, 132u / nl), granules);
      const uint32_t plan_bps = (granules + want - 1) / want * granule;
      if (plan_only && bps != (batch == 1 ? 9u : batch == 4 ? 33u : 130u) && bps != plan_bps) continue;
      if (plan_only && kTileTokens != 64 && bps != plan_bps) continue;
      {
        DecodeParams p;
        p.q = s.q; p.arena = s.arena; p.slot_bytes = BB; p.arena_slots = s.slots; p.chunk_tokens = CT; p.chunk_shift = 6;
        p.list_begin = s.begin; p.last_tokens = s.last; p.blocks_per_split = bps; p.scale_log2 = 0.0883883f * kLog2e;
        p.o = s.ws; p.lse = s.ws + uint64_t{splits} * rows * HD; p.o_split_stride = rows * HD; p.lse_split_stride = rows;
        const uint32_t per_set = nl * LB; const uint32_t sets = s.scat_count / per_set;
        auto set_ids = [&](int i) { p.slot_ids = s.scat + uint64_t(i % sets) * per_set; };
        const double kern = time_us(st, s, reps, [&](int i) { set_ids(i); auto r = launch_decode_kernel<128, 4>(p, nl, splits, st); if (!r.ok()) { fprintf(stderr, "%s\n", r.to_string().c_str()); exit(1);} });
        const double rd = time_us(st, s, reps, [&](int i) { set_ids(i); read_kernel<128, 4><<<dim3(nl, splits), kThreads, Cfg::kSmemBytes, st>>>(p); });
        CK(cudaGetLastError());
        const double gb = double(batch) * KVH * LB * BB / 1e3;
        printf("%s{\"batch\": %u, \"bps\": %u, \"splits\": %u, \"ctas\": %u, \"kernel_us\": %.2f, \"read_us\": %.2f, \"kernel_gbps\": %.0f}\n",
               firstrow ? "" : ",", batch, bps, splits, splits * nl, kern, rd, gb / kern);
        firstrow = false;
      }
    }
  }
  printf("]}\n");
  return 0;
}
