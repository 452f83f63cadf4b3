// CpuEngine: the CPU half of a decode step, run in parallel. oneTBB tasks over
// (KV head x block range) in a task arena whose threads hwloc binds to the
// cores of one NUMA node (the one nearest the GPU when known); oneDNN's own
// OpenMP pool is sized so that the two pools never oversubscribe the cores.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvtier/core/status.h"
#include "kvtier/core/tensor.h"
#include "kvtier/cpu/kernels.h"

namespace kvtier::cpu {

struct EngineOptions {
  unsigned threads = 0;  // 0: every core of the NUMA node (or of the machine)
  int numa_node = -1;    // -1: no binding (the caller passes numa_node_of_pci of the GPU when known)
  Isa isa = Isa::kScalar;
  bool isa_auto = true;  // true: best_isa(); false: `isa` (must be available)
};

// score, select, attend, far_field, build_summaries, parallel_for and run may
// be called from several threads at once (each call has its own scratch);
// the prefill_scores_* calls may not.
class CpuEngine {
 public:
  // Fails naming the value when threads exceed the node's cores or the ISA is unavailable.
  static Result<std::unique_ptr<CpuEngine>> create(const EngineOptions& options);
  ~CpuEngine();

  unsigned threads() const;
  Isa isa() const;
  // "16 threads bound to NUMA node 0 (cores 0-15), avx512_bf16 kernels, oneDNN: 16 OpenMP threads"
  std::string describe() const;

  // score_summaries over every block, split over (KV head x block range).
  void score(Bf16View<2> q, const SummaryTable& table, float scale, ScoreRule rule, MutF32View<2> scores);
  // select_topk for every KV head in parallel; out[h] is the selection of head h.
  void select(F32View<2> scores, uint32_t k, uint32_t far_begin, uint32_t far_end,
              std::vector<std::vector<uint32_t>>& out);
  // attend_blocks with each head's list split into ranges, partials merged exactly.
  void attend(Bf16View<2> q, std::span<const std::vector<HostBlock>> blocks, uint32_t chunk_tokens, float scale,
              PartialState& out);
  // far_field, split the same way.
  void far_field(Bf16View<2> q, const SummaryTable& table, std::span<const std::vector<uint32_t>> blocks, float scale,
                 PartialState& out);
  // build_summary for every (h, b) of a layer whose blocks are given per head.
  void build_summaries(std::span<const std::vector<HostBlock>> blocks, uint32_t chunk_tokens, SummaryTable& table);

  // Runs fn(begin, end) over sub-ranges of [0, n), each at least `grain` long
  // where n allows, on the engine's bound threads; returns when all are done.
  void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn);
  // Runs fn inside the engine's task arena, so that oneTBB work it starts (a
  // flow graph) runs on the engine's bound threads.
  void run(const std::function<void()>& fn);

  // While a WarmHold lives (at most `limit`), the engine's worker threads spin
  // in its arena instead of going to sleep, yielding their core to any other
  // runnable thread. A caller about to run a short serial phase between two
  // parallel calls takes one and releases it just before the second call:
  // waking oneTBB's sleeping workers takes them one after another (on the
  // 16-vCPU GPU host a 4 MiB attend call ran at 24 GB/s against 77 for a
  // 128 MiB one), and the hold moves that wake-up into the serial phase.
  // Work submitted while the hold lives runs only on the threads not spinning.
  class WarmHold {
   public:
    WarmHold() = default;
    WarmHold(WarmHold&& o) noexcept = default;
    WarmHold& operator=(WarmHold&& o) noexcept;
    WarmHold(const WarmHold&) = delete;
    WarmHold& operator=(const WarmHold&) = delete;
    ~WarmHold() { release(); }
    void release();

   private:
    friend class CpuEngine;
    explicit WarmHold(std::shared_ptr<std::atomic<bool>> stop) : stop_(std::move(stop)) {}
    std::shared_ptr<std::atomic<bool>> stop_;
  };
  [[nodiscard]] WarmHold keep_warm(std::chrono::microseconds limit);

  // Prefill scoring: scores [queries][blocks] = q [queries][head_dim] x kmean [blocks][head_dim]^T
  // (one head), bf16 inputs, fp32 output. Through a oneDNN matmul, or the hand-written kernel.
  Status prefill_scores_onednn(Bf16View<2> q, Bf16View<2> kmean, MutF32View<2> scores);
  void prefill_scores_own(Bf16View<2> q, Bf16View<2> kmean, MutF32View<2> scores);

  struct Impl;

 private:
  explicit CpuEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier::cpu
