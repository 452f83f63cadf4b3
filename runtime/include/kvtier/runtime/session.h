// The Engine and Session API (DESIGN.md sections 3, 4, 8): a context of one
// sequence whose KV lives in three tiers (GPU slots, pinned host RAM, an NVMe
// file), prefilled in query blocks and decoded one layer at a time, with the
// GPU and the CPU attending at once and their partial states merged exactly.
//
// An Engine owns what sessions share: the compute backend (CUDA when a GPU is
// there, else the CPU backend whose "gpu" tier is host memory), the CPU engine,
// one GPU slot arena of gpu_bytes for every session (so that a batch of
// sequences is one kernel launch), the executor and its statistics. A Session
// is one sequence: its TieredStore (host homes and staging out of host_bytes,
// the rest in a file under nvme_dir), its summaries and its tail block.
//
// Layers advance independently: prefill(layer, first_token, ...) needs
// first_token == tokens(layer), and decode of one token is decode_step(layer)
// for every layer in order. Nothing is computed from a block that failed its
// checksum: such a step returns the error and the session stays usable.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvtier/core/bf16.h"
#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"
#include "kvtier/core/status.h"
#include "kvtier/scheduler/executor.h"
#include "kvtier/scheduler/planner.h"
#include "kvtier/scheduler/trace.h"

namespace kvtier::runtime {

// A Chrome trace of a run's lanes (EngineOptions::trace), as the runtime offers it.
using TraceRecorder = scheduler::TraceRecorder;

enum class DeviceChoice : uint8_t { kAuto, kCpu, kCuda };

struct EngineOptions {
  ModelShape shape;
  SparsityPolicy policy;
  uint64_t gpu_bytes = 0;      // the gpu tier (one arena shared by all sessions)
  uint64_t host_bytes = 0;     // per session: host homes plus the nvme staging cache
  uint64_t host_cache_bytes = 0;  // of host_bytes, the staging cache (0: a quarter, at least 64 blocks)
  std::filesystem::path nvme_dir;  // session files go here
  DeviceChoice device = DeviceChoice::kAuto;
  int cuda_device = 0;
  unsigned cpu_threads = 0;    // 0: every core of the GPU's NUMA node (or the machine)
  // Sessions open at once (a decode batch); the gpu tier is split evenly between them.
  uint32_t max_sessions = 1;
  scheduler::LatePolicy late = scheduler::LatePolicy::kWait;
  bool warm_workers = true;  // scheduler::ExecutorOptions::warm_workers
  bool poll_reads = true;    // scheduler::ExecutorOptions::poll_reads
  storage::GpuEviction gpu_eviction = storage::GpuEviction::kHomeAware;  // scheduler::ExecutorOptions::gpu_eviction
  uint32_t home_write_batch_blocks = static_cast<uint32_t>(storage::kFileBatchBlocks);  // scheduler::ExecutorOptions::home_write_batch_blocks
  bool score_on_gpu = true;  // scheduler::ExecutorOptions::score_on_gpu
  bool drop_optional_reads = true;  // scheduler::ExecutorOptions::drop_optional_reads
  bool early_reads = true;          // scheduler::ExecutorOptions::early_reads
  bool fetch_read_ahead = true;     // scheduler::ExecutorOptions::fetch_read_ahead
  // The cost model's rates; unset: built-in estimates for this backend.
  std::optional<scheduler::CostRates> rates;
  scheduler::TraceRecorder* trace = nullptr;  // not owned; null: no trace
};

class Session;

// One sequence's inputs to a decode step of one layer.
struct DecodeRequest {
  Session* session = nullptr;
  std::span<const bf16> q;  // [q_heads][head_dim]
  std::span<const bf16> k;  // [kv_heads][head_dim], the new token's key (after RoPE)
  std::span<const bf16> v;  // [kv_heads][head_dim]
  std::span<float> out;     // [q_heads][head_dim], normalised attention output
};

class Engine {
 public:
  // Checks shape, policy and budgets (naming the field); picks the backend.
  static Result<std::unique_ptr<Engine>> create(const EngineOptions& options);
  ~Engine();

  // A new, empty context of up to max_tokens tokens in a file `name`.kv under
  // nvme_dir. Fails before touching anything when the tiers cannot hold it.
  Result<std::unique_ptr<Session>> create_session(uint64_t max_tokens, const std::string& name);
  // A context saved by Session::save(), from its .kv file: no re-prefill.
  // A file of another shape or policy is an error naming both.
  Result<std::unique_ptr<Session>> open_session(const std::filesystem::path& kv_file);

  // One decode step of `layer` for a batch of sessions (each its own context
  // length and selection); one GPU launch per kernel for the whole batch.
  Status decode_layer(uint32_t layer, std::span<const DecodeRequest> batch);

  const EngineOptions& options() const;
  bool on_gpu() const;          // the CUDA backend runs the gpu half
  std::string describe() const; // backend, CPU engine, arena, rates
  scheduler::ExecutorStats stats() const;  // cumulative since create or reset_stats
  void reset_stats();
  // The late-block policy of the steps that follow (a run can compare both
  // on one prefilled context).
  void set_late_policy(scheduler::LatePolicy late);
  scheduler::Executor& executor();

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class Session;
};

class Session {
 public:
  ~Session();

  // Tokens of `layer` held so far.
  uint64_t tokens(uint32_t layer) const;
  // Tokens every layer holds (the minimum over layers).
  uint64_t tokens() const;
  uint64_t max_tokens() const;

  // Prefill of tokens [first_token, first_token + n) of `layer`: q, k, v are
  // [n][heads][head_dim] bf16. Block-sparse attention (sinks, the causal
  // window, the block's own chunks and the top-k far chunks for the block);
  // completed blocks get summaries and are written home (and cached on the
  // GPU while slots last). out, if not empty, receives [n][q_heads][head_dim].
  Status prefill(uint32_t layer, uint64_t first_token, uint32_t n, std::span<const bf16> q,
                 std::span<const bf16> k, std::span<const bf16> v, std::span<float> out = {});

  // One decode step of one layer for this sequence alone.
  Status decode_step(uint32_t layer, std::span<const bf16> q, std::span<const bf16> k, std::span<const bf16> v,
                     std::span<float> out);

  // Makes the context durable: every block in the file, summaries and the
  // tail in a sidecar, so Engine::open_session reopens it in a later process.
  Status save();
  const std::filesystem::path& path() const;

  // Bytes per tier: homes on host and nvme, gpu copies, summaries.
  scheduler::Placement placement() const;

  // Fidelity of the last decode step of `layer` (DESIGN.md section 8): dense
  // fp64 attention of q over every token of the layer, read back from all
  // tiers, against `out` as returned, and the attended set the step used.
  Result<cpu::FidelityReport> verify_last_step(uint32_t layer, std::span<const bf16> q,
                                               std::span<const float> out);
  // What the last decode step of `layer` selected per KV head (far chunks).
  const std::vector<std::vector<uint32_t>>& last_selection(uint32_t layer) const;

  scheduler::SequenceKv& kv();

 private:
  friend class Engine;
  Session(Engine* engine, std::unique_ptr<scheduler::SequenceKv> kv);
  Engine* engine_;
  std::unique_ptr<scheduler::SequenceKv> kv_;
  std::filesystem::path path_;
};

}  // namespace kvtier::runtime
