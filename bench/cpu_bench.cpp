// `kvtier bench cpu`: the CPU half of a decode step (DESIGN.md section 3) at
// the Llama-3.1-8B layer shape (8 KV heads, 32 q heads, head_dim 128) and a
// 1M-token context (16384 blocks of 64 tokens), measured through CpuEngine
// against a streaming read of memory with the same threads in the same run.
//
// Every timed pass reads cold memory, as a decode step does (the summaries of
// 32 layers are 2 GiB, more than any cache): before each pass, untimed, every
// cache line of its inputs is flushed with clflush, which evicts it from all
// cache levels of all cores. A 64 MiB table fits some last-level caches (this
// build machine reports 2 x 508 MiB), so without the flush a repeated pass
// would measure the cache; flushing instead of rotating over copies that
// outgrow the cache keeps the footprint small.
#include <immintrin.h>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "kvtier/core/assert.h"
#include "kvtier/core/sizes.h"
#include "kvtier/core/sysinfo.h"
#include "kvtier/cpu/cpu_features.h"
#include "kvtier/cpu/engine.h"
#include "kvtier/cpu/topology.h"
#include "suites.h"

namespace kvtier::bench {
namespace {

using cpu::CpuEngine;
using cpu::Isa;
using cpu::SummaryTable;

constexpr uint32_t kKvHeads = 8, kQHeads = 32, kHeadDim = 128, kChunkTokens = 64;
constexpr uint32_t kBlocks = 16384;  // 1M tokens in 64-token blocks
constexpr uint32_t kLayers = 32;
constexpr uint32_t kTopk = 64;
// Default policy: 128 sink tokens and a 4096-token window are attended anyway,
// so selection ranks the blocks between them.
constexpr uint32_t kFarBegin = 128 / kChunkTokens, kFarEnd = kBlocks - 4096 / kChunkTokens;
constexpr uint32_t kHostBlocksPerHead = 512;  // 4096 selected host blocks per layer
constexpr uint32_t kStepBlocksPerHead = 16;   // 128 blocks (4 MiB): one decode step's host share
constexpr uint64_t kBlockBytes = uint64_t{2} * kChunkTokens * kHeadDim * sizeof(bf16);  // 32 KiB
constexpr uint64_t kKvBytesPerLayer = uint64_t{kKvHeads} * kHostBlocksPerHead * kBlockBytes;  // 128 MiB
constexpr uint64_t kSummaryF32Bytes = uint64_t{kKvHeads} * kBlocks * kHeadDim * sizeof(float);  // 64 MiB
// The host tier the selected blocks sit in: 4 x the blocks of one layer's selection.
constexpr uint64_t kArenaSlots = uint64_t{4} * kKvHeads * kHostBlocksPerHead;  // 512 MiB
// The needle study: a fact of this many tokens inside a 64-token block.
constexpr uint32_t kNeedleTokens = 3;
const float kScale = 1.f / std::sqrt(float(kHeadDim));

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<std::byte[], FreeDeleter>;

// 2 MiB-aligned and advised onto transparent huge pages, as the host arena
// (storage/host_arena.cpp) and the summary tables are: with 4 KiB pages,
// scattered 32 KiB blocks would measure TLB misses the runtime does not have.
Buffer aligned_buffer(uint64_t bytes) {
  constexpr uint64_t kHuge = uint64_t{2} << 20;
  const uint64_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  auto* p = static_cast<std::byte*>(std::aligned_alloc(kHuge, rounded));
  KVT_ASSERT(p != nullptr, "cannot allocate ", bytes, " bytes for the cpu benchmark");
  ::madvise(p, rounded, MADV_HUGEPAGE);  // advice only: a kernel without THP keeps 4 KiB pages
  return Buffer(p);
}

// ---------------------------------------------------------------- inputs

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [-1, 1) on a grid of 2^-23 (exactly zero once in 2^24 draws).
float unit(uint64_t& s) { return static_cast<float>(splitmix64(s) >> 40) * 0x1p-23f - 1.f; }

// Fills n elements with make(state) in parallel, each chunk seeded by its index.
template <class T, class Make>
void fill_parallel(T* p, size_t n, uint64_t seed, const Make& make) {
  tbb::parallel_for(tbb::blocked_range<size_t>(0, n, size_t{1} << 18), [&](const tbb::blocked_range<size_t>& r) {
    uint64_t s = seed ^ (r.begin() * 0x2545f4914f6cdd1dull);
    for (size_t i = r.begin(); i < r.end(); ++i) p[i] = make(s);
  });
}

std::vector<bf16> random_bf16(size_t n, uint64_t seed, float amplitude) {
  std::vector<bf16> v(n);
  fill_parallel(v.data(), n, seed, [&](uint64_t& s) { return bf16::from_float(amplitude * unit(s)); });
  return v;
}

// A summary table of uniform [-1, 1) mean keys, for speed runs. Filled row by
// row, in parallel, so that no assumption about row padding is made.
std::unique_ptr<SummaryTable> random_table(SummaryKind kind, uint64_t seed) {
  auto t = std::make_unique<SummaryTable>(kKvHeads, kBlocks, kHeadDim, kind);
  for (uint32_t b = 0; b < kBlocks; ++b) t->tokens(b) = kChunkTokens;
  tbb::parallel_for(tbb::blocked_range<uint32_t>(0, kKvHeads * kBlocks, 1024), [&](const auto& rows) {
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + rows.begin();
    for (uint32_t r = rows.begin(); r < rows.end(); ++r) {
      const uint32_t h = r / kBlocks, b = r % kBlocks;
      if (kind == SummaryKind::kMeanBf16)
        std::generate_n(t->kmean_bf16(h, b), kHeadDim, [&] { return bf16::from_float(unit(s)); });
      else
        std::generate_n(t->kmean_f32(h, b), kHeadDim, [&] { return unit(s); });
    }
  });
  return t;
}

using Tables = std::vector<std::unique_ptr<SummaryTable>>;

Tables random_tables(SummaryKind kind, uint32_t count, uint64_t seed) {
  Tables out;
  for (uint32_t i = 0; i < count; ++i) out.push_back(random_table(kind, seed + i));
  return out;
}

// ---------------------------------------------------------------- the read ceiling

__attribute__((target("avx512f"))) uint64_t read_avx512(const std::byte* p, size_t bytes) {
  // Four independent accumulators keep four 64-byte loads in flight per iteration.
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  for (size_t i = 0; i + 256 <= bytes; i += 256) {
    a = _mm512_xor_si512(a, _mm512_load_si512(p + i));
    b = _mm512_xor_si512(b, _mm512_load_si512(p + i + 64));
    c = _mm512_xor_si512(c, _mm512_load_si512(p + i + 128));
    d = _mm512_xor_si512(d, _mm512_load_si512(p + i + 192));
  }
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d)));
  return std::accumulate(lanes, lanes + 8, uint64_t{0}, [](uint64_t x, uint64_t y) { return x ^ y; });
}

__attribute__((target("avx2"))) uint64_t read_avx2(const std::byte* p, size_t bytes) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (size_t i = 0; i + 128 <= bytes; i += 128) {
    a = _mm256_xor_si256(a, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_xor_si256(b, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    c = _mm256_xor_si256(c, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    d = _mm256_xor_si256(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t lanes[4];
  const __m256i all = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), all);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

uint64_t read_scalar(const std::byte* p, size_t bytes) {
  uint64_t a[8] = {};
  for (size_t i = 0; i + 64 <= bytes; i += 64)
    for (int k = 0; k < 8; ++k) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * k, 8);
      a[k] ^= w;
    }
  return a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
}

using ReadFn = uint64_t (*)(const std::byte*, size_t);

std::pair<ReadFn, const char*> best_read() {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  if (f.avx512f) return {read_avx512, "avx512 (4 x 64-byte loads in flight per thread)"};
  if (f.avx2) return {read_avx2, "avx2 (4 x 32-byte loads in flight per thread)"};
  return {read_scalar, "scalar (8 x 8-byte loads)"};
}

volatile uint64_t g_sink;

// ---------------------------------------------------------------- plan and context

struct Plan {
  int warmup = 1, repeats = 9, slow_repeats = 5;
  uint32_t prefill_queries = 4096;
  uint32_t decode_layers = kLayers;  // layers actually run; the figure scales to 32
  uint32_t overlap_queries = 32;
  uint32_t needle_depths = 32;
  uint64_t llc_bytes = 0;            // all last-level cache instances together
};

uint64_t last_level_cache_bytes(const cpu::Topology& topo) {
  if (topo.caches.empty()) return 0;
  const cpu::CacheLevel& c = topo.caches.back();
  return c.size_bytes * c.instances;
}

Plan make_plan(const SuiteArgs& args, const cpu::Topology& topo) {
  Plan p;
  if (args.quick) {
    p.repeats = 5;
    p.slow_repeats = 3;
    p.prefill_queries = 1024;
    p.decode_layers = 4;
    p.overlap_queries = 8;
    p.needle_depths = 16;
  }
  p.llc_bytes = last_level_cache_bytes(topo);
  return p;
}

// Bytes held at once at the peak (the decode step): one fp32 table per layer
// run (mean keys and, as SummaryTable allocates them, mean values) and the
// host arena; the prefill scores come after them.
uint64_t peak_bytes(const Plan& p) {
  const uint64_t tables = uint64_t{p.decode_layers} * 2 * kSummaryF32Bytes;
  return tables + kArenaSlots * kBlockBytes;
}

struct Bench {
  const SuiteArgs& args;
  Plan plan;
  std::unique_ptr<CpuEngine> engine, scalar;
  tbb::task_arena arena;  // the read ceiling's threads: as many as the engine's
  nlohmann::json config;
};

void progress(const char* what) {
  std::fprintf(stderr, "cpu bench: %s\n", what);
  std::fflush(stderr);
}

// ---------------------------------------------------------------- cold, interleaved passes

using Ranges = std::vector<std::pair<const void*, uint64_t>>;

void flush_lines(const void* p, uint64_t bytes) {
  const auto* first = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63});
  for (const char* line = first; line < static_cast<const char*>(p) + bytes; line += 64) _mm_clflush(line);
}

// Flushes `ranges` (pointer, bytes) from every cache, on plain threads: a
// oneTBB arena would keep its worker spinning into the next timed pass, and
// the engine's arena would start that pass without it.
void flush_all(Bench& b, const Ranges& ranges) {
  const unsigned n = b.engine->threads();
  const auto share = [&](unsigned i) {
    for (size_t r = ranges.size() * i / n; r < ranges.size() * (i + 1) / n; ++r)
      flush_lines(ranges[r].first, ranges[r].second);
  };
  std::vector<std::thread> helpers;
  for (unsigned i = 1; i < n; ++i) helpers.emplace_back(share, i);
  share(0);
  for (std::thread& t : helpers) t.join();
  _mm_mfence();
}

// Each KV head's rows of a table's mean keys.
void add_table(Ranges& ranges, const SummaryTable& t) {
  for (uint32_t h = 0; h < t.kv_heads(); ++h) {
    const bool b16 = t.kind() == SummaryKind::kMeanBf16;
    const auto* first = b16 ? static_cast<const void*>(t.kmean_bf16(h, 0)) : t.kmean_f32(h, 0);
    const uint32_t end = t.blocks() - 1;
    const auto* last = b16 ? static_cast<const void*>(t.kmean_bf16(h, end)) : t.kmean_f32(h, end);
    const uint64_t row_bytes = uint64_t{t.head_dim()} * (b16 ? 2 : 4);
    ranges.emplace_back(first, static_cast<const char*>(last) - static_cast<const char*>(first) + row_bytes);
  }
}

void add_blocks(Ranges& ranges, const std::vector<std::vector<cpu::HostBlock>>& lists) {
  for (const auto& head : lists)
    for (const cpu::HostBlock& blk : head) ranges.emplace_back(blk.data, kBlockBytes);
}

// One measured operation: its pass, and the inputs flushed (untimed) before
// each pass so that it reads DRAM; nothing flushed means measured warm.
struct Subject {
  std::function<void()> pass;
  Ranges cold;
  std::vector<double> seconds;

  double median_s() const {
    std::vector<double> s = seconds;
    std::sort(s.begin(), s.end());
    const size_t n = s.size();
    return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
  }
};

// Runs every subject once per round (time_it of a single pass), rounds
// after `warmup` recorded. Figures and their baselines take turns pass by
// pass, so a machine whose speed drifts (other tenants, clocks) moves both alike.
void run_rounds(Bench& b, const std::vector<Subject*>& subjects, int repeats) {
  for (int i = 0; i < b.plan.warmup + repeats; ++i)
    for (Subject* s : subjects) {
      if (!s->cold.empty()) flush_all(b, s->cold);
      const double t = time_it(s->pass, 0, 1).median_s;
      if (i >= b.plan.warmup) s->seconds.push_back(t);
    }
}

// ---------------------------------------------------------------- figures

struct Figures {
  double mem_read_gbps = 0;
  double score_f32_gbps = 0, score_f32_ms = 0, score_bf16_gbps = 0, score_scalar_gbps = 0, topk_ms = 0, topk_gbps = 0;
  double attention_gbps = 0, scattered_read_gbps = 0, decode_32_ms = 0;
  double attention_step_gbps = 0;
  double prefill_own_gflops = 0, prefill_onednn_gflops = 0;
  double overlap_jaccard = 0, overlap_changed = 0, needle_f32 = 0, needle_bf16 = 0;
};

double gbps(uint64_t bytes, double seconds) { return static_cast<double>(bytes) / seconds / 1e9; }

// The host tier: kArenaSlots block slots of random bf16; each layer's
// selection is 4096 blocks (512 per KV head) at random slots, as the slot
// allocator leaves them after a long run.
struct HostKv {
  Buffer arena;
  std::vector<std::vector<std::vector<cpu::HostBlock>>> lists;  // [layer][kv head][block]
};

HostKv make_host_kv(Bench& b, uint32_t layers) {
  HostKv kv{aligned_buffer(kArenaSlots * kBlockBytes), {}};
  auto* elems = reinterpret_cast<bf16*>(kv.arena.get());
  b.arena.execute([&] {
    fill_parallel(elems, kArenaSlots * kBlockBytes / sizeof(bf16), 99,
                  [](uint64_t& s) { return bf16::from_float(unit(s)); });
  });
  std::mt19937_64 gen(2026);
  std::vector<uint64_t> slots(kArenaSlots);
  for (uint32_t l = 0; l < layers; ++l) {
    std::iota(slots.begin(), slots.end(), uint64_t{0});
    std::shuffle(slots.begin(), slots.end(), gen);
    auto& heads = kv.lists.emplace_back(kKvHeads);
    for (uint32_t i = 0; i < kKvHeads * kHostBlocksPerHead; ++i)
      heads[i / kHostBlocksPerHead].push_back({elems + slots[i] * (kBlockBytes / sizeof(bf16)), kChunkTokens});
  }
  return kv;
}

// The ceiling: every thread streams its share of a buffer as large as the
// fp32 summaries with the widest loads this CPU has.
Subject read_subject(Bench& b, const Buffer& buf) {
  const auto [read, name] = best_read();
  b.config["read_kernel"] = name;
  Subject s{[arena = &b.arena, base = buf.get(), read = read] {
              arena->execute([&] {
                tbb::parallel_for(tbb::blocked_range<size_t>(0, kSummaryF32Bytes / 4096, 64), [&](const auto& r) {
                  g_sink = g_sink ^ read(base + r.begin() * 4096, r.size() * 4096);
                });
              });
            },
            {{buf.get(), kSummaryF32Bytes}},
            {}};
  return s;
}

// The ceiling of host attention's access pattern: the same scattered 32 KiB
// blocks read whole with the same loads and threads, and no arithmetic.
Subject scattered_read_subject(Bench& b, const HostKv& kv) {
  std::vector<const std::byte*> blocks;
  for (const auto& head : kv.lists[0])
    for (const cpu::HostBlock& blk : head) blocks.push_back(reinterpret_cast<const std::byte*>(blk.data));
  Subject s{[arena = &b.arena, blocks = std::move(blocks), read = best_read().first] {
              arena->execute([&] {
                tbb::parallel_for(tbb::blocked_range<size_t>(0, blocks.size(), 8), [&](const auto& r) {
                  for (size_t i = r.begin(); i < r.end(); ++i) g_sink = g_sink ^ read(blocks[i], kBlockBytes);
                });
              });
            },
            {},
            {}};
  add_blocks(s.cold, kv.lists[0]);
  return s;
}

Subject score_subject(CpuEngine& engine, const SummaryTable& table, const std::vector<bf16>& q,
                      std::vector<float>& scores) {
  // Pointers, not references to the parameters: the pass outlives this call.
  Subject s{[e = &engine, t = &table, qv = Bf16View<2>(q, {kQHeads, kHeadDim}),
             sv = MutF32View<2>(scores, {kKvHeads, kBlocks})] {
              e->score(qv, *t, kScale, cpu::ScoreRule::kMaxDot, sv);
            },
            {},
            {}};
  add_table(s.cold, table);
  return s;
}

// The inputs of the bandwidth figures, alive together for the interleaved rounds.
struct BandwidthInputs {
  Buffer read_buf = aligned_buffer(kSummaryF32Bytes);
  std::unique_ptr<SummaryTable> bf16_table = random_table(SummaryKind::kMeanBf16, 1000);
  std::vector<bf16> q = random_bf16(size_t{kQHeads} * kHeadDim, 7, 2.f);
  std::vector<float> scores = std::vector<float>(size_t{kKvHeads} * kBlocks);
  std::vector<float> scores_other = scores;
  std::vector<std::vector<uint32_t>> selected;
  cpu::PartialState out = cpu::PartialState::empty(kQHeads, kHeadDim);
};

// The streaming read, fp32 / bf16 / scalar scoring, host attention and
// top-k (warm: in a decode step the 512 KiB of scores were just written),
// interleaved round by round.
void measure_bandwidths(Bench& b, const SummaryTable& f32, const HostKv& kv, Figures& f) {
  BandwidthInputs in;
  b.arena.execute([&] {
    fill_parallel(reinterpret_cast<uint64_t*>(in.read_buf.get()), kSummaryF32Bytes / 8, 1, splitmix64);
  });
  Subject read = read_subject(b, in.read_buf);
  Subject score = score_subject(*b.engine, f32, in.q, in.scores);
  Subject score_b16 = score_subject(*b.engine, *in.bf16_table, in.q, in.scores_other);
  Subject score_scalar = score_subject(*b.scalar, f32, in.q, in.scores_other);
  Subject attend{[&] { b.engine->attend(Bf16View<2>(in.q, {kQHeads, kHeadDim}), kv.lists[0], kChunkTokens, kScale,
                                        in.out); },
                 {},
                 {}};
  add_blocks(attend.cold, kv.lists[0]);
  // The size one decode step hands the engine: kStepBlocksPerHead blocks per
  // KV head (a few hundred selected blocks minus the GPU-resident ones).
  std::vector<std::vector<cpu::HostBlock>> step_lists(kKvHeads);
  for (uint32_t h = 0; h < kKvHeads; ++h)
    step_lists[h].assign(kv.lists[0][h].begin(), kv.lists[0][h].begin() + kStepBlocksPerHead);
  Subject attend_step{[&] { b.engine->attend(Bf16View<2>(in.q, {kQHeads, kHeadDim}), step_lists, kChunkTokens,
                                             kScale, in.out); },
                      {},
                      {}};
  add_blocks(attend_step.cold, step_lists);
  Subject scattered = scattered_read_subject(b, kv);
  Subject topk{[&] {
                 b.engine->select(F32View<2>(in.scores, {kKvHeads, kBlocks}), kTopk, kFarBegin, kFarEnd, in.selected);
               },
               {},
               {}};
  run_rounds(b, {&read, &score, &topk, &score_b16, &attend, &attend_step, &scattered, &score_scalar},
             b.plan.repeats);
  f.mem_read_gbps = gbps(kSummaryF32Bytes, read.median_s());
  f.score_f32_gbps = gbps(f32.scoring_bytes(), score.median_s());
  f.score_f32_ms = score.median_s() * 1e3;
  f.score_bf16_gbps = gbps(in.bf16_table->scoring_bytes(), score_b16.median_s());
  f.score_scalar_gbps = gbps(f32.scoring_bytes(), score_scalar.median_s());
  f.attention_gbps = gbps(kKvBytesPerLayer, attend.median_s());
  f.attention_step_gbps = gbps(uint64_t{kKvHeads} * kStepBlocksPerHead * kBlockBytes, attend_step.median_s());
  f.scattered_read_gbps = gbps(kKvBytesPerLayer, scattered.median_s());
  f.topk_ms = topk.median_s() * 1e3;
  f.topk_gbps = gbps(uint64_t{kKvHeads} * (kFarEnd - kFarBegin) * sizeof(float), topk.median_s());
}

// Scoring + top-k + host attention for decode_layers layers, each with its
// own summary table, query and block selection, from cold caches; the time
// scales to 32 layers when fewer run.
double measure_decode(Bench& b, const Tables& tables, const HostKv& kv) {
  const uint32_t layers = b.plan.decode_layers;
  const std::vector<bf16> q = random_bf16(size_t{layers} * kQHeads * kHeadDim, 10, 2.f);
  std::vector<float> scores(size_t{kKvHeads} * kBlocks);
  std::vector<std::vector<uint32_t>> selected;
  cpu::PartialState out = cpu::PartialState::empty(kQHeads, kHeadDim);
  const size_t q_elems = size_t{kQHeads} * kHeadDim;
  Subject step{[&] {
                 for (uint32_t l = 0; l < layers; ++l) {
                   const Bf16View<2> ql(std::span<const bf16>(q).subspan(l * q_elems, q_elems), {kQHeads, kHeadDim});
                   b.engine->score(ql, *tables[l], kScale, cpu::ScoreRule::kMaxDot,
                                   MutF32View<2>(scores, {kKvHeads, kBlocks}));
                   b.engine->select(F32View<2>(scores, {kKvHeads, kBlocks}), kTopk, kFarBegin, kFarEnd, selected);
                   b.engine->attend(ql, kv.lists[l], kChunkTokens, kScale, out);
                 }
               },
               {},
               {}};
  for (uint32_t l = 0; l < layers; ++l) {
    add_table(step.cold, *tables[l]);
    add_blocks(step.cold, kv.lists[l]);
  }
  run_rounds(b, {&step}, b.plan.slow_repeats);
  return step.median_s() * 1e3 * kLayers / layers;
}

// Prefill scoring of one KV head's summaries: GFLOP/s of our GEMM and
// oneDNN's, taking turns. Warm: the inputs (5 MiB) are the GEMM's to reuse.
bool measure_prefill(Bench& b, Figures& f) {
  const uint32_t m = b.plan.prefill_queries;
  const std::vector<bf16> q = random_bf16(size_t{m} * kHeadDim, 11, 2.f);
  const std::vector<bf16> kmean = random_bf16(size_t{kBlocks} * kHeadDim, 12, 1.f);
  std::vector<float> scores(size_t{m} * kBlocks);
  const Bf16View<2> qv(q, {m, kHeadDim}), kv(kmean, {kBlocks, kHeadDim});
  const MutF32View<2> sv(scores, {m, kBlocks});
  Status st;
  Subject own{[&] { b.engine->prefill_scores_own(qv, kv, sv); }, {}, {}};
  Subject onednn{[&] {
                   if (st.ok()) st = b.engine->prefill_scores_onednn(qv, kv, sv);
                 },
                 {},
                 {}};
  run_rounds(b, {&own, &onednn}, b.plan.slow_repeats);
  if (!st.ok()) {
    std::fprintf(stderr, "kvtier bench cpu: prefill_scoring_onednn cannot be measured: %s\n", st.to_string().c_str());
    return false;
  }
  const double gflop = 2.0 * m * kBlocks * kHeadDim / 1e9;
  f.prefill_own_gflops = gflop / own.median_s();
  f.prefill_onednn_gflops = gflop / onednn.median_s();
  return true;
}

// ---------------------------------------------------------------- summary format study

// The bf16 rounding of an fp32 table's mean keys.
std::unique_ptr<SummaryTable> to_bf16(const SummaryTable& from) {
  auto t = std::make_unique<SummaryTable>(kKvHeads, kBlocks, kHeadDim, SummaryKind::kMeanBf16);
  tbb::parallel_for(uint32_t{0}, kKvHeads * kBlocks, [&](uint32_t r) {
    const uint32_t h = r / kBlocks, blk = r % kBlocks;
    const float* in = from.kmean_f32(h, blk);
    std::transform(in, in + kHeadDim, t->kmean_bf16(h, blk), [](float x) { return bf16::from_float(x); });
  });
  for (uint32_t blk = 0; blk < kBlocks; ++blk) t->tokens(blk) = from.tokens(blk);
  return t;
}

std::vector<std::vector<uint32_t>> top_sets(CpuEngine& engine, Bf16View<2> q, const SummaryTable& table) {
  std::vector<float> scores(size_t{kKvHeads} * kBlocks);
  engine.score(q, table, kScale, cpu::ScoreRule::kMaxDot, MutF32View<2>(scores, {kKvHeads, kBlocks}));
  std::vector<std::vector<uint32_t>> sel;
  engine.select(F32View<2>(scores, {kKvHeads, kBlocks}), kTopk, kFarBegin, kFarEnd, sel);
  return sel;
}

double jaccard(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
  const std::set<uint32_t> sa(a.begin(), a.end()), sb(b.begin(), b.end());
  size_t both = 0;
  for (uint32_t x : sa) both += sb.count(x);
  const size_t either = sa.size() + sb.size() - both;
  return either == 0 ? 1.0 : static_cast<double>(both) / static_cast<double>(either);
}

// Random mean keys and queries: how the top-64 sets of the bf16 table differ from fp32's.
void measure_overlap(Bench& b, const SummaryTable& f32, Figures& f) {
  const std::unique_ptr<SummaryTable> b16 = to_bf16(f32);
  double sum = 0, changed = 0;
  for (uint32_t i = 0; i < b.plan.overlap_queries; ++i) {
    const std::vector<bf16> q = random_bf16(size_t{kQHeads} * kHeadDim, 100 + i, 2.f);
    const Bf16View<2> qv(q, {kQHeads, kHeadDim});
    const auto a = top_sets(*b.engine, qv, f32), c = top_sets(*b.engine, qv, *b16);
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      const double j = jaccard(a[h], c[h]);
      sum += j;
      changed += j < 1.0 ? 1 : 0;
    }
  }
  const double sets = double(b.plan.overlap_queries) * kKvHeads;
  f.overlap_jaccard = sum / sets;
  f.overlap_changed = changed / sets;
}

// Mean keys of blocks of 64 random keys (uniform [-1, 1) per dimension): the
// mean of 64 such values has variance (1/3) / 64, drawn here as a normal.
std::unique_ptr<SummaryTable> needle_haystack() {
  auto t = std::make_unique<SummaryTable>(kKvHeads, kBlocks, kHeadDim, SummaryKind::kMeanF32);
  for (uint32_t blk = 0; blk < kBlocks; ++blk) t->tokens(blk) = kChunkTokens;
  tbb::parallel_for(uint32_t{0}, kKvHeads * kBlocks, [&](uint32_t r) {
    std::mt19937_64 gen(r + 77);
    std::normal_distribution<float> noise(0.f, std::sqrt(1.f / 3.f / kChunkTokens));
    std::generate_n(t->kmean_f32(r / kBlocks, r % kBlocks), kHeadDim, [&] { return noise(gen); });
  });
  return t;
}

// Plants in block `blk` of every KV head a fact of kNeedleTokens keys that
// point along the head's first q head with the norm of a typical key
// (sqrt(head_dim / 3)); returns the rows it replaced.
std::vector<float> plant(SummaryTable& t, const std::vector<bf16>& q, uint32_t blk) {
  std::vector<float> saved;
  const uint32_t group = kQHeads / kKvHeads;
  const float key_norm = std::sqrt(kHeadDim / 3.f);
  for (uint32_t h = 0; h < kKvHeads; ++h) {
    const bf16* qh = q.data() + size_t{h} * group * kHeadDim;
    double norm = 0;
    for (uint32_t d = 0; d < kHeadDim; ++d) norm += double(qh[d].to_float()) * qh[d].to_float();
    float* row = t.kmean_f32(h, blk);
    saved.insert(saved.end(), row, row + kHeadDim);
    const float w = kNeedleTokens * key_norm / kChunkTokens / static_cast<float>(std::sqrt(norm));
    for (uint32_t d = 0; d < kHeadDim; ++d) row[d] += w * qh[d].to_float();
  }
  return saved;
}

void measure_needles(Bench& b, Figures& f) {
  const std::unique_ptr<SummaryTable> hay = needle_haystack();
  double found_f32 = 0, found_bf16 = 0;
  const uint32_t depths = b.plan.needle_depths;
  for (uint32_t i = 0; i < depths; ++i) {
    const auto blk = static_cast<uint32_t>(kFarBegin + (uint64_t{kFarEnd - kFarBegin} * (2 * i + 1)) / (2 * depths));
    const std::vector<bf16> q = random_bf16(size_t{kQHeads} * kHeadDim, 500 + i, 2.f);
    const Bf16View<2> qv(q, {kQHeads, kHeadDim});
    const std::vector<float> saved = plant(*hay, q, blk);
    const auto a = top_sets(*b.engine, qv, *hay), c = top_sets(*b.engine, qv, *to_bf16(*hay));
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      found_f32 += std::count(a[h].begin(), a[h].end(), blk);
      found_bf16 += std::count(c[h].begin(), c[h].end(), blk);
      std::copy_n(saved.begin() + size_t{h} * kHeadDim, kHeadDim, hay->kmean_f32(h, blk));
    }
  }
  f.needle_f32 = found_f32 / (double(depths) * kKvHeads);
  f.needle_bf16 = found_bf16 / (double(depths) * kKvHeads);
}

// ---------------------------------------------------------------- the run

bool measure_all(Bench& b, Figures& f) {
  progress("summary tables and the host block arena");
  const Tables f32 = random_tables(SummaryKind::kMeanF32, b.plan.decode_layers, 1);
  {
    const HostKv kv = make_host_kv(b, b.plan.decode_layers);
    progress("read ceiling, summary scoring, top-k, host attention (interleaved)");
    measure_bandwidths(b, *f32[0], kv, f);
    progress("decode step");
    f.decode_32_ms = measure_decode(b, f32, kv);
  }
  progress("summary format study");
  measure_overlap(b, *f32[0], f);
  measure_needles(b, f);
  progress("prefill scoring");
  return measure_prefill(b, f);
}

void report(Bench& b, const Figures& f) {
  Report r("cpu", b.config);
  r.add("mem_read_bw", f.mem_read_gbps, "GB/s");
  r.add("summary_scoring_1m", f.score_f32_gbps, "GB/s", "mem_read_bw");
  r.add("summary_scoring_1m_bf16", f.score_bf16_gbps, "GB/s", "summary_scoring_1m");
  r.add("block_attention_host", f.attention_gbps, "GB/s", "mem_read_bw");
  r.add("block_attention_step", f.attention_step_gbps, "GB/s", "block_attention_host");
  // What the scattered access pattern allows on this machine, and the kernel against it.
  r.add("scattered_block_read_bw", f.scattered_read_gbps, "GB/s", "mem_read_bw");
  r.add("block_attention_host_vs_scattered", f.attention_gbps, "GB/s", "scattered_block_read_bw");
  r.add("summary_scoring_1m_scalar", f.score_scalar_gbps, "GB/s", "summary_scoring_1m");
  r.add("summary_scoring_1m_ms", f.score_f32_ms, "ms");
  r.add("topk_1m", f.topk_ms, "ms", "summary_scoring_1m_ms");
  r.add("topk_1m_scores", f.topk_gbps, "GB/s");  // fp32 scores of the far blocks ranked per second
  r.add("prefill_scoring_own", f.prefill_own_gflops, "GFLOP/s");
  r.add("prefill_scoring_onednn", f.prefill_onednn_gflops, "GFLOP/s", "prefill_scoring_own");
  r.add("decode_step_cpu_32_layers_ms", f.decode_32_ms, "ms");
  r.add("random_topk_overlap_bf16_vs_f32", f.overlap_jaccard, "fraction");
  r.add("random_topk_changed_sets_bf16_vs_f32", f.overlap_changed, "fraction");
  r.add("needle_recall_f32", f.needle_f32, "fraction");
  r.add("needle_recall_bf16", f.needle_bf16, "fraction");
  r.print(b.args);
}

nlohmann::json plan_config(const Bench& b) {
  const Plan& p = b.plan;
  nlohmann::json c = {
      {"threads", b.engine->threads()},
      {"threads_rule", "--threads, or 0: one per physical core (the engine never runs two on one core)"},
      {"placement", "engine and read-ceiling threads both unbound, so figure and baseline share placement"},
      {"isa", std::string(cpu::isa_name(b.engine->isa()))},
      {"engine", b.engine->describe()},
      {"shape", "8 KV heads, 32 q heads, head_dim 128, 16384 blocks of 64 tokens (1M tokens), one layer"},
      {"summary_bytes_f32", kSummaryF32Bytes},
      {"summary_bytes_bf16", kSummaryF32Bytes / 2},
      {"mem_read_bytes", kSummaryF32Bytes},
      {"host_attention_step", "the first " + std::to_string(kStepBlocksPerHead) +
                                  " blocks per KV head of host_attention (4 MiB), one call: a decode step's size"},
      {"host_attention", "4096 blocks (512 per KV head) of 32 KiB = 128 MiB at random slots of a " +
                             format_bytes(kArenaSlots * kBlockBytes) + " arena"},
      {"topk", "64 per KV head among blocks [2, 16320): 128 sink and 4096 window tokens excluded"},
      {"prefill", std::to_string(p.prefill_queries) + " queries x 16384 summaries x 128, bf16 in, fp32 out, one head"},
      {"decode_step", "score + top-64 + attention over 512 host blocks per KV head, " +
                          std::to_string(p.decode_layers) + " layers run with their own tables, scaled to 32"},
      {"cold_cache", "before every timed pass (untimed) each cache line of its inputs is clflushed from all "
                     "cache levels; the last-level cache hwloc reports is " + format_bytes(p.llc_bytes) +
                         " over all instances, vs 64 MiB of fp32 summaries; top-k and prefill run warm"},
      {"interleaving", "read, fp32/bf16/scalar scoring, top-k and attention take turns pass by pass, as do "
                       "the two prefill GEMMs, so drift on a shared machine moves figure and baseline alike"},
      {"summary_study", "fp32 vs its bf16 rounding; random: uniform [-1, 1) mean keys, " +
                            std::to_string(p.overlap_queries) + " random queries x 8 heads; needle: " +
                            std::to_string(p.needle_depths) + " depths x 8 heads, " + std::to_string(kNeedleTokens) +
                            " of the block's 64 keys along q (typical key norm), other means N(0, 1/192)"},
      {"warmup", p.warmup},
      {"repeats", p.repeats},
      {"repeats_slow", p.slow_repeats},
      {"statistic", "median"}};
  if (b.args.quick)
    c["quick"] = "prefill 1024 queries (4096 full), decode 4 layers scaled to 32 (32 full), 8 overlap queries "
                 "(32), 16 needle depths (32), 5/3 repeats (9/5)";
  return c;
}

Result<std::unique_ptr<CpuEngine>> engine_for(unsigned threads, bool scalar) {
  // Unbound, like the read ceiling's arena: figure and baseline run under the same placement.
  return CpuEngine::create({threads, -1, Isa::kScalar, !scalar});
}

}  // namespace

int run_cpu(const SuiteArgs& args) {
  const Result<cpu::Topology> topo = cpu::load_topology();
  auto engine = engine_for(args.threads, false);
  auto scalar = engine_for(args.threads, true);
  if (!topo.ok() || !engine.ok() || !scalar.ok()) {
    const Status& st = !topo.ok() ? topo.status() : !engine.ok() ? engine.status() : scalar.status();
    std::fprintf(stderr, "kvtier bench cpu: %s\n", st.to_string().c_str());
    return 1;
  }
  const unsigned threads = (*engine)->threads();
  Bench b{args, make_plan(args, *topo), std::move(*engine), std::move(*scalar), tbb::task_arena(int(threads)), {}};
  const uint64_t need = peak_bytes(b.plan), available = mem_available_bytes();
  if (available != 0 && need > available / 10 * 9) {
    std::fprintf(stderr, "kvtier bench cpu: needs about %s of memory, %s available\n", format_bytes(need).c_str(),
                 format_bytes(available).c_str());
    return 1;
  }
  b.config = plan_config(b);
  b.config["peak_bytes"] = need;
  Figures f;
  if (!measure_all(b, f)) return 1;
  report(b, f);
  return 0;
}

}  // namespace kvtier::bench
