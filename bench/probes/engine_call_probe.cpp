// Fixed cost of one CpuEngine::attend call (not built by CMake; a probe
// behind the executor's in-step CPU attention). Times attend over a decode
// step's share of host blocks (16 or 128 per KV head, 8 KV heads, 32 q heads,
// head dim 128, 64-token blocks at random slots of a 256 MiB arena) for
// engines of several thread counts, with the calls back to back, behind
// 300 us of single-threaded work on the calling thread (what the executor's
// serial plan node does between its parallel calls), and behind a 300 us
// sleep, and behind the same work under CpuEngine::keep_warm. Prints JSON lines. Build from the repository root after building
// build-gpu (or any build folder), e.g.:
//   g++ -O2 -std=c++20 -Icpu/include -Iruntime/core/include \
//     bench/probes/engine_call_probe.cpp \
//     build-gpu/lib/libkvtier_cpu.a build-gpu/lib/libkvtier_core.a \
//     -ltbb -lhwloc -ldnnl -fopenmp -o /tmp/probe && /tmp/probe
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/cpu/engine.h"

using namespace kvtier;
using Clock = std::chrono::steady_clock;

namespace {
constexpr uint32_t kQHeads = 32, kKvHeads = 8, kHeadDim = 128, kChunk = 64;
constexpr size_t kBlockElems = size_t{2} * kChunk * kHeadDim;
constexpr size_t kSlots = 8192;  // 256 MiB of bf16 blocks

double us_since(Clock::time_point t0) { return std::chrono::duration<double, std::micro>(Clock::now() - t0).count(); }

void busy(double us) {
  const auto t0 = Clock::now();
  while (us_since(t0) < us) {
  }
}
}  // namespace

int main() {
  std::vector<bf16> arena(kSlots * kBlockElems);
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (size_t i = 0; i < arena.size(); i += 7) arena[i] = bf16::from_float(u(gen));
  std::vector<bf16> q(size_t{kQHeads} * kHeadDim);
  for (auto& x : q) x = bf16::from_float(u(gen));
  const unsigned hw = std::thread::hardware_concurrency();
  for (unsigned threads : {2u, 4u, 8u, 16u}) {
    if (threads > hw) continue;
    cpu::EngineOptions opt;
    opt.threads = threads;
    auto engine = cpu::CpuEngine::create(opt);
    if (!engine.ok()) {
      std::fprintf(stderr, "engine(%u): %s\n", threads, engine.status().to_string().c_str());
      continue;
    }
    for (uint32_t per_head : {16u, 128u}) {
      std::vector<size_t> slots(kSlots);
      std::iota(slots.begin(), slots.end(), size_t{0});
      std::shuffle(slots.begin(), slots.end(), gen);
      std::vector<std::vector<cpu::HostBlock>> lists(kKvHeads);
      for (uint32_t i = 0; i < kKvHeads * per_head; ++i)
        lists[i / per_head].push_back({arena.data() + slots[i] * kBlockElems, kChunk});
      cpu::PartialState out = cpu::PartialState::empty(kQHeads, kHeadDim);
      for (const std::string mode : {"back_to_back", "after_300us_busy", "after_300us_sleep", "after_300us_busy_warm"}) {
        std::vector<double> t;
        for (int i = 0; i < 120; ++i) {
          if (mode == "after_300us_busy") busy(300);
          if (mode == "after_300us_sleep") std::this_thread::sleep_for(std::chrono::microseconds(300));
          if (mode == "after_300us_busy_warm") {
            cpu::CpuEngine::WarmHold hold = (*engine)->keep_warm(std::chrono::milliseconds(2));
            busy(300);
          }
          const auto t0 = Clock::now();
          (*engine)->attend(Bf16View<2>(q, {kQHeads, kHeadDim}), lists, kChunk, 0.088f, out);
          if (i >= 20) t.push_back(us_since(t0));
        }
        std::sort(t.begin(), t.end());
        const double med = t[t.size() / 2];
        const double bytes = double(kKvHeads) * per_head * kBlockElems * 2;
        std::printf("{\"threads\": %u, \"blocks\": %u, \"mode\": \"%s\", \"median_us\": %.1f, \"p90_us\": %.1f, "
                    "\"gbps\": %.1f}\n",
                    threads, kKvHeads * per_head, mode.c_str(), med, t[t.size() * 9 / 10], bytes / med / 1e3);
      }
    }
  }
}
