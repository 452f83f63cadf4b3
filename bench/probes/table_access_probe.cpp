// Cost of the decode plan's per-block table work on this host (not built by
// CMake; a probe behind the executor's plan node). A 4M-entry table of
// 56-byte entries (a 1M-token Llama-3.1-8B context: 32 layers x 8 KV heads x
// 16K blocks) with a doubly linked LRU list over it, in 4 KiB pages and in
// transparent huge pages (madvise). Per step: 512 lookups (64 random blocks
// in each of 8 KV heads of one layer: what TieredStore::residency reads),
// then the same blocks unlinked from the LRU list and relinked at its head
// (what a GPU pin and its unpin do to the eviction policy). Between steps a
// 64 MiB buffer is streamed, as the CPU's attention does. Prints JSON lines
// with the median microseconds per step of each. Build and run:
//   g++ -O2 -std=c++20 bench/probes/table_access_probe.cpp -o /tmp/table_probe && /tmp/table_probe
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

struct Entry {  // the size of storage::BlockEntry
  uint8_t flags[8];
  uint32_t slots[8];
  uint64_t step;
  uint32_t checksum, pad;
};
static_assert(sizeof(Entry) == 56);

constexpr size_t kHuge = size_t{2} << 20;

void* map(size_t bytes, bool huge) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 0, bytes);
  return p;
}

size_t round_up(size_t b) { return (b + kHuge - 1) / kHuge * kHuge; }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  constexpr uint32_t kBlocks = 32u * 8u * 16384u;
  std::vector<char> stream(size_t{64} << 20, 1);
  for (const bool huge : {false, true}) {
    auto* table = static_cast<Entry*>(map(round_up(sizeof(Entry) * kBlocks), huge));
    auto* prev = static_cast<uint32_t*>(map(round_up(4u * (kBlocks + 1)), huge));
    auto* next = static_cast<uint32_t*>(map(round_up(4u * (kBlocks + 1)), huge));
    // A list in random order; node kBlocks is the head sentinel.
    std::vector<uint32_t> order(kBlocks);
    for (uint32_t i = 0; i < kBlocks; ++i) order[i] = i;
    std::mt19937 rng(7);
    std::shuffle(order.begin(), order.end(), rng);
    uint32_t last = kBlocks;
    for (uint32_t b : order) {
      next[last] = b;
      prev[b] = last;
      last = b;
    }
    next[last] = kBlocks;
    prev[kBlocks] = last;
    std::vector<double> lookup_us, lru_us;
    std::vector<uint32_t> idx;
    uint64_t sum = 0;
    for (int step = 0; step < 400; ++step) {
      for (size_t i = 0; i < stream.size(); i += 64) sum += static_cast<unsigned char>(stream[i]);
      const uint32_t layer = static_cast<uint32_t>(step) % 32;
      idx.assign(512, 0);
      for (uint32_t h = 0; h < 8; ++h)
        for (uint32_t j = 0; j < 64; ++j) idx[h * 64 + j] = (layer * 8 + h) * 16384 + rng() % 16384;
      std::sort(idx.begin(), idx.end());
      idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
      auto t0 = std::chrono::steady_clock::now();
      for (uint32_t b : idx) sum += table[b].flags[0] + table[b].slots[1];
      auto t1 = std::chrono::steady_clock::now();
      for (uint32_t b : idx) {  // pin: unlink
        next[prev[b]] = next[b];
        prev[next[b]] = prev[b];
        table[b].step = static_cast<uint64_t>(step);
      }
      for (uint32_t b : idx) {  // unpin: link at the head
        next[b] = next[kBlocks];
        prev[b] = kBlocks;
        prev[next[kBlocks]] = b;
        next[kBlocks] = b;
      }
      auto t2 = std::chrono::steady_clock::now();
      if (step >= 50) {
        lookup_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        lru_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
      }
    }
    std::printf("{\"pages\": \"%s\", \"blocks_per_step\": %zu, \"lookup_us_median\": %.2f, \"lru_unlink_relink_us_median\": %.2f, \"checksum\": %llu}\n",
                huge ? "thp_advised" : "4k", idx.size(), median(lookup_us), median(lru_us),
                static_cast<unsigned long long>(sum % 1000));
  }
  FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  char line[128] = "unknown";
  if (f != nullptr) {
    if (std::fgets(line, sizeof line, f) == nullptr) std::strcpy(line, "unreadable");
    std::fclose(f);
  }
  line[std::strcspn(line, "\n")] = 0;
  std::printf("{\"transparent_hugepage\": \"%s\"}\n", line);
}
