// Decode's top-k alone (not built by CMake; a probe behind cpu:topk_1m): 64 of
// each KV head's 16318 far blocks at 1M tokens, 8 KV heads of normal random
// fp32 scores, back to back (warm caches): select_topk one head after the
// other on the calling thread, and CpuEngine::select (heads in parallel on
// the engine's threads). Prints JSON. Build from the repository root after
// building build (or any build folder):
//   g++ -O2 -std=c++20 -Icpu/include -Iruntime/core/include bench/probes/topk_probe.cpp \
//     build/lib/libkvtier_cpu.a build/lib/libkvtier_core.a -ltbb -lhwloc -ldnnl -fopenmp -o /tmp/topk_probe && /tmp/topk_probe
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "kvtier/cpu/engine.h"
#include "kvtier/cpu/kernels.h"

using namespace kvtier;

namespace {

double median_us(int reps, const std::function<void()>& fn) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main() {
  constexpr uint32_t kHeads = 8, kBlocks = 16384, kTopk = 64, kFarBegin = 2, kFarEnd = 16320;
  std::vector<float> s(size_t{kHeads} * kBlocks);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& x : s) x = normal(rng);
  const F32View<2> view(s, {kHeads, kBlocks});
  std::vector<uint32_t> one;
  const double serial = median_us(500, [&] {
    for (uint32_t h = 0; h < kHeads; ++h) cpu::select_topk(view, h, kTopk, kFarBegin, kFarEnd, one);
  });
  auto engine = cpu::CpuEngine::create(cpu::EngineOptions{});
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().to_string().c_str());
    return 1;
  }
  std::vector<std::vector<uint32_t>> all;
  const double parallel = median_us(500, [&] { (*engine)->select(view, kTopk, kFarBegin, kFarEnd, all); });
  const double scores = double{kHeads} * (kFarEnd - kFarBegin);
  std::printf("{\"serial_us\": %.1f, \"serial_ns_per_score\": %.3f, \"engine_us\": %.1f, \"engine_threads\": %u}\n",
              serial, serial * 1e3 / scores, parallel, (*engine)->threads());
}
