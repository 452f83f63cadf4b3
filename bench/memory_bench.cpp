// `kvtier bench memory`: host memory bandwidth, the ceiling that CPU attention
// and summary scoring are measured against. Reads a buffer much larger than
// the caches with one thread and with all threads (oneTBB), and copies it.
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "harness.h"
#include "kvtier/core/assert.h"
#include "suites.h"

namespace kvtier::bench {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

std::unique_ptr<uint64_t[], FreeDeleter> filled_buffer(size_t words) {
  auto* p = static_cast<uint64_t*>(std::aligned_alloc(4096, words * sizeof(uint64_t)));
  KVT_ASSERT(p != nullptr, "cannot allocate ", words * 8, " bytes for the memory benchmark");
  // Non-zero, distinct data: zero pages can be shared and read faster than real memory.
  for (size_t i = 0; i < words; ++i) p[i] = i * 0x9e3779b97f4a7c15ull;
  return std::unique_ptr<uint64_t[], FreeDeleter>(p);
}

uint64_t xor_range(const uint64_t* p, size_t n) {
  // Eight independent lanes keep several loads in flight.
  uint64_t a[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) a[k] ^= p[i + k];
  for (; i < n; ++i) a[0] ^= p[i];
  return a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
}

volatile uint64_t g_sink;

}  // namespace

int run_memory(const SuiteArgs& args) {
  const size_t bytes = args.quick ? (size_t{256} << 20) : (size_t{2} << 30);
  const size_t words = bytes / sizeof(uint64_t);
  const unsigned threads = args.threads ? args.threads : std::max(1u, std::thread::hardware_concurrency());
  const int warmup = 1, repeats = args.quick ? 5 : 9;
  auto src = filled_buffer(words);
  auto dst = filled_buffer(words);
  const double gb = static_cast<double>(bytes) / 1e9;

  const Timing one = time_it([&] { g_sink = xor_range(src.get(), words); }, warmup, repeats);
  tbb::task_arena arena(static_cast<int>(threads));
  const Timing all = time_it(
      [&] {
        arena.execute([&] {
          tbb::parallel_for(tbb::blocked_range<size_t>(0, words, size_t{1} << 16), [&](const auto& r) {
            g_sink = xor_range(src.get() + r.begin(), r.size());
          });
        });
      },
      warmup, repeats);
  const Timing copy = time_it([&] { std::memcpy(dst.get(), src.get(), bytes); }, warmup, repeats);
  // Copies split over all threads, as the CPU backend makes its "uploads".
  const Timing copy_all = time_it(
      [&] {
        arena.execute([&] {
          tbb::parallel_for(tbb::blocked_range<size_t>(0, bytes, size_t{1} << 20), [&](const auto& r) {
            std::memcpy(reinterpret_cast<char*>(dst.get()) + r.begin(),
                        reinterpret_cast<const char*>(src.get()) + r.begin(), r.size());
          });
        });
      },
      warmup, repeats);

  Report report("memory", {{"buffer_bytes", bytes}, {"threads", threads}, {"warmup", warmup}, {"repeats", repeats},
                           {"statistic", "median"}});
  report.add("read_gbps_single_thread", gb / one.median_s, "GB/s");
  report.add("read_gbps_all_threads", gb / all.median_s, "GB/s", "read_gbps_single_thread");
  // A copy reads and writes every byte: count both, as the device copy ceilings do.
  report.add("copy_gbps_single_thread", 2 * gb / copy.median_s, "GB/s", "read_gbps_single_thread");
  report.add("copy_gbps_all_threads", 2 * gb / copy_all.median_s, "GB/s", "copy_gbps_single_thread");
  report.print(args);
  return 0;
}

}  // namespace kvtier::bench
