// The memory-tier simulator (simulator.h): capacity arithmetic, the modeled
// selection statistics, one planned layer step timed on the lane schedule,
// and a per-query-block prefill model. docs/plan.md states the equations.
#include "kvtier/scheduler/simulator.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>

#include "kvtier/core/sizes.h"
#include "kvtier/storage/block_file.h"

namespace kvtier::scheduler {
namespace {

constexpr const char* kWhat = "simulator";
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string num(double x) {
  char text[32];
  std::snprintf(text, sizeof text, "%.4g", x);
  return text;
}

std::string gib(double bytes) { return num(bytes / kGiB) + " GiB"; }

uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

uint64_t block_bytes_of(const ModelShape& shape, const SparsityPolicy& p) {
  return 2ull * p.chunk_tokens * shape.head_dim * dtype_bytes(shape.dtype);
}

// Blocks per (sequence, layer, KV head) that stay on the GPU: sinks, the
// window, and one more because an unaligned window spans one extra block.
uint64_t hot_chunks(uint64_t chunks, const SparsityPolicy& p) {
  return std::min(chunks, ceil_div(p.sink_tokens, p.chunk_tokens) + ceil_div(p.window_tokens, p.chunk_tokens) + 1);
}

// The planner's far range [far_begin, far_end) of a context (kvtier::chunk_ranges).
std::pair<uint32_t, uint32_t> far_range(uint64_t tokens, const SparsityPolicy& p) {
  const ChunkRanges r = chunk_ranges(p, tokens);
  return {r.far_begin, r.far_end};
}

Status check_inputs(const SimInputs& in) {
  KVT_RETURN_IF_ERROR(validate(in.model.shape));
  KVT_RETURN_IF_ERROR(validate(in.policy));
  KVT_RETURN_IF_ERROR(validate(in.machine));
  if (in.context_tokens == 0) return invalid_field(kWhat, "context_tokens", 0, "must be > 0");
  if (in.context_tokens > in.constants.max_context_tokens_searched)
    return invalid_field(kWhat, "context_tokens", in.context_tokens,
                         "exceeds " + std::to_string(in.constants.max_context_tokens_searched) + " tokens");
  if (in.batch == 0 || in.batch > 4096) return invalid_field(kWhat, "batch", in.batch, "must be in 1..4096");
  if (in.model.weights_bytes == 0) return invalid_field(kWhat, "weights_bytes", 0, "must be > 0");
  if (in.model.parameters == 0) return invalid_field(kWhat, "parameters", 0, "must be > 0");
  if (in.selection_shares) {
    const MeasuredSelection& m = *in.selection_shares;
    if (!(m.gpu_share >= 0 && m.nvme_share >= 0 && m.gpu_share + m.nvme_share <= 1 + 1e-9))
      return invalid_argument(std::string(kWhat) + ": selection_shares gpu=" + num(m.gpu_share) + ", nvme=" +
                              num(m.nvme_share) + ": each must be >= 0 and together at most 1 (the rest is host)");
  }
  if (in.selection_overlap && !(*in.selection_overlap >= 0.0 && *in.selection_overlap <= 1.0))
    return invalid_argument(std::string(kWhat) + ": selection_overlap=" + num(*in.selection_overlap) +
                            " must be in [0, 1]");
  const uint64_t gpu_mem = in.machine.gpu.memory_bytes;
  if (in.gpu_budget_bytes && (*in.gpu_budget_bytes == 0 || *in.gpu_budget_bytes + in.model.weights_bytes > gpu_mem))
    return invalid_field(kWhat, "gpu_budget_bytes", *in.gpu_budget_bytes,
                         "must be > 0 and leave room for the weights (" + std::to_string(in.model.weights_bytes) +
                             " bytes) in GPU memory (" + std::to_string(gpu_mem) + " bytes)");
  if (in.host_budget_bytes && (*in.host_budget_bytes == 0 || *in.host_budget_bytes > in.machine.host.memory_bytes))
    return invalid_field(kWhat, "host_budget_bytes", *in.host_budget_bytes,
                         "must be > 0 and at most host memory (" + std::to_string(in.machine.host.memory_bytes) +
                             " bytes)");
  return Status::ok_status();
}

// The staging caches (one per sequence) beside the host budget must fit host
// memory; checked once the default budget is known.
Status check_host_cache(const SimInputs& in, const Capacity& c) {
  if (!in.host_cache_bytes) return Status::ok_status();
  const uint64_t mem = in.machine.host.memory_bytes, per_sequence = *in.host_cache_bytes;
  const uint64_t budget = c.placement.host_budget_bytes;
  if (per_sequence > mem / in.batch || budget > mem - per_sequence * in.batch)
    return invalid_field(kWhat, "host_cache_bytes", per_sequence,
                         "per sequence, x batch " + std::to_string(in.batch) + " beside the host budget (" +
                             std::to_string(budget) + " bytes) must fit host memory (" + std::to_string(mem) +
                             " bytes)");
  return Status::ok_status();
}

// The default GPU budget for KV; negative when weights and reserve do not fit.
double default_gpu_budget(const SimInputs& in) {
  const double mem = static_cast<double>(in.machine.gpu.memory_bytes);
  const SimConstants& k = in.constants;
  return mem - static_cast<double>(in.model.weights_bytes) - k.gpu_reserve_bytes_fixed - k.gpu_reserve_fraction * mem;
}

// Capacity of an already checked input.
Capacity capacity_of(const SimInputs& in) {
  const ModelShape& s = in.model.shape;
  const SparsityPolicy& p = in.policy;
  Capacity c;
  c.block_bytes = block_bytes_of(s, p);
  const uint64_t heads = uint64_t{in.batch} * s.layers * s.kv_heads;  // (sequence, layer, KV head) lists
  const uint64_t chunks = ceil_div(in.context_tokens, p.chunk_tokens);
  const uint64_t blocks = heads * chunks;
  c.kv_bytes = blocks * c.block_bytes;
  c.summary_bytes = blocks * summary_row_bytes(s, p.summary_kind);
  Placement& pl = c.placement;
  const uint64_t hot_blocks = heads * hot_chunks(chunks, p);
  pl.gpu_hot_bytes = hot_blocks * c.block_bytes;
  const double gpu_budget = in.gpu_budget_bytes ? static_cast<double>(*in.gpu_budget_bytes) : default_gpu_budget(in);
  pl.gpu_budget_bytes = gpu_budget > 0 ? static_cast<uint64_t>(gpu_budget) : 0;
  const double host_mem = static_cast<double>(in.machine.host.memory_bytes);
  const double host_budget = in.host_budget_bytes ? static_cast<double>(*in.host_budget_bytes)
                                                  : in.constants.host_budget_fraction * host_mem -
                                                        static_cast<double>(c.summary_bytes);
  pl.host_budget_bytes = host_budget > 0 ? static_cast<uint64_t>(host_budget) : 0;

  const uint64_t far_blocks = blocks - hot_blocks;
  // The executor mirrors mean keys in GPU slots when they take at most a
  // quarter of a sequence's share (reserve_gpu_summaries).
  const bool mean_keys = p.summary_kind == SummaryKind::kMeanBf16 || p.summary_kind == SummaryKind::kMeanF32;
  // The CPU stand-in scores on the CPU (the executor scores on a GPU only).
  if (in.score_on_gpu && !in.machine.gpu.cpu_standin && mean_keys && p.topk_chunks > 0 &&
      c.summary_bytes <= pl.gpu_budget_bytes / 4)
    pl.gpu_summary_bytes = c.summary_bytes;
  const uint64_t gpu_used = pl.gpu_hot_bytes + pl.gpu_summary_bytes;
  const uint64_t gpu_room = pl.gpu_budget_bytes > gpu_used ? pl.gpu_budget_bytes - gpu_used : 0;
  pl.gpu_cache_blocks = gpu_room / c.block_bytes;
  const uint64_t cached = std::min(pl.gpu_cache_blocks, far_blocks);
  const uint64_t host_blocks = std::min(far_blocks - cached, pl.host_budget_bytes / c.block_bytes);
  const uint64_t nvme_blocks = far_blocks - cached - host_blocks;
  pl.gpu = {(hot_blocks + cached) * c.block_bytes, hot_blocks + cached};
  pl.host = {host_blocks * c.block_bytes, host_blocks};
  pl.nvme = {nvme_blocks * c.block_bytes, nvme_blocks};
  pl.nvme_home_bytes = nvme_blocks == 0 ? 0 : (nvme_blocks + pl.gpu.blocks) * c.block_bytes;

  c.fits = true;
  if (gpu_budget <= 0 || pl.gpu_hot_bytes > pl.gpu_budget_bytes) {
    c.fits = false;
    c.overflow_tier = "gpu";
    c.overflow_reason = gpu_budget <= 0 ? "the weights (" + gib(static_cast<double>(in.model.weights_bytes)) +
                                              ") and the reserve leave no GPU memory for KV"
                                        : "the hot set (sinks + window of every sequence, " +
                                              gib(static_cast<double>(pl.gpu_hot_bytes)) +
                                              ") exceeds the GPU budget (" + gib(gpu_budget) + ")";
  } else if (host_budget <= 0 ||
             (in.host_budget_bytes && static_cast<double>(c.summary_bytes) + host_budget > host_mem)) {
    c.fits = false;
    c.overflow_tier = "host";
    c.overflow_reason = "the summaries (" + gib(static_cast<double>(c.summary_bytes)) +
                        ") and the host KV budget do not fit host RAM (" + gib(host_mem) + ")";
  } else if (pl.nvme_home_bytes > in.machine.nvme.capacity_bytes) {
    c.fits = false;
    c.overflow_tier = "nvme";
    c.overflow_reason = "the NVMe file must hold " + gib(static_cast<double>(pl.nvme_home_bytes)) +
                        " (blocks beyond host RAM plus the homes of GPU-held blocks); the drive has " +
                        gib(static_cast<double>(in.machine.nvme.capacity_bytes));
  }
  return c;
}

// Largest context (a multiple of chunk_tokens) that fits, by bisection: fit is
// monotone in the context, since every tier's demand grows with it and the
// host budget only shrinks (summaries).
uint64_t max_context_that_fits(SimInputs in) {
  const uint64_t chunk = in.policy.chunk_tokens;
  auto fits = [&](uint64_t chunks) {
    in.context_tokens = chunks * chunk;
    return capacity_of(in).fits;
  };
  uint64_t lo = 0, hi = in.constants.max_context_tokens_searched / chunk;
  if (fits(hi)) return hi * chunk;
  while (hi - lo > 1) {  // fits(lo) (or lo == 0), !fits(hi)
    const uint64_t mid = lo + (hi - lo) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  return lo * chunk;
}

}  // namespace

double gpu_attend_fraction(uint32_t batch) {
  constexpr std::array<std::pair<double, double>, 3> kMeasured{{{1, 0.394}, {4, 0.764}, {16, 0.981}}};
  const double x = std::log2(std::max<double>(batch, 1));
  if (x >= std::log2(kMeasured.back().first)) return kMeasured.back().second;
  for (size_t i = 1; i < kMeasured.size(); ++i) {
    const double x0 = std::log2(kMeasured[i - 1].first), x1 = std::log2(kMeasured[i].first);
    if (x <= x1) return kMeasured[i - 1].second + (x - x0) / (x1 - x0) * (kMeasured[i].second - kMeasured[i - 1].second);
  }
  return kMeasured.back().second;
}

CostRates rates_from_profile(const MachineProfile& m, const ModelShape& shape, const SparsityPolicy& policy,
                             uint32_t batch, const SimConstants& k) {
  const uint64_t block = block_bytes_of(shape, policy);
  CostRates r;
  // The CPU stand-in's hbm_read_gbps is its measured attention rate already.
  r.gpu_attend_gbps = m.gpu.hbm_read_gbps * (m.gpu.cpu_standin ? 1.0 : gpu_attend_fraction(batch));
  r.cpu_attend_gbps = m.host.attend_gbps;
  r.cpu_score_gbps = m.host.score_gbps;
  r.cpu_topk_gbps = m.host.topk_gbps;
  r.h2d_gbps = k.gather_fraction_of_copy * m.link.gbps_at(LinkDirection::kHostToDevice, k.link_large_copy_bytes);
  // One layer's completed blocks of the batch go down as one batched copy.
  r.d2h_gbps = m.link.gbps_at(LinkDirection::kDeviceToHost, block * shape.kv_heads * std::max<uint32_t>(batch, 1));
  r.nvme_read_gbps = m.nvme.read_gbps_at(block, k.nvme_queue_depth);
  r.nvme_write_gbps = m.nvme.write_gbps_at(block, k.nvme_queue_depth);
  r.nvme_latency_us = m.nvme.latency_us;
  r.launch_us = k.launch_us;
  r.host_list_us = m.host.prepare_us_per_list;
  r.host_block_us = m.host.plan_us_per_block;
  r.host_step_us = m.host.step_overhead_us;
  r.cpu_call_us = m.host.attend_call_us;
  return r;
}

Result<Capacity> capacity(const SimInputs& in) {
  KVT_RETURN_IF_ERROR(check_inputs(in));
  Capacity c = capacity_of(in);
  KVT_RETURN_IF_ERROR(check_host_cache(in, c));
  return c;
}

namespace {

// A cache of `cache` blocks over `blocks` blocks of which `working_set` are
// selected per step: last step's selection stays while the cache holds it
// (share o of a step's selection), and a new selection is in the rest of the
// cache by the share of the other blocks it holds (new_share).
struct CacheHits {
  double new_share = 0, share = 0;
};
CacheHits lru_hits(double cache, double blocks, double working_set, double o) {
  CacheHits c;
  if (working_set <= 0) return c;
  c.new_share = blocks > working_set ? std::clamp((cache - working_set) / (blocks - working_set), 0.0, 1.0) : 0.0;
  c.share = std::min(1.0, cache / working_set) * o + (1.0 - o) * c.new_share;
  return c;
}

// Steady state of a selected NVMe-homed block (model_selection below): read
// this step (n), staged in host memory only, or on the GPU (g).
struct NvmeStates {
  double n = 0, staged = 0, g = 0;
};
NvmeStates nvme_states(double o, double kappa, double s, double u) {
  NvmeStates x;
  x.n = (1.0 - o) * std::max(0.0, 1.0 - kappa - s);
  const double denominator = 1.0 - o * (1.0 - u);
  x.staged = denominator > 1e-12 ? (o * x.n + (1.0 - o) * s) / denominator : 1.0 - kappa;
  x.g = std::max(0.0, 1.0 - x.staged - x.n);
  return x;
}

// Where the selected blocks are, modeled (simulator.h SelectionModel), with
// `u` the share of re-selected staged blocks the planner uploads.
SelectionModel model_selection(const SimInputs& in, const Capacity& c, double u = 1.0) {
  SelectionModel sel;
  sel.overlap = in.selection_overlap.value_or(kDefaultSelectionOverlap);
  sel.staged_upload_share = u;
  const double o = sel.overlap;
  const auto [begin, end] = far_range(in.context_tokens, in.policy);
  sel.topk_blocks = std::min<uint32_t>(in.policy.topk_chunks, end - begin);
  const Placement& pl = c.placement;
  const uint64_t off_gpu = pl.host.blocks + pl.nvme.blocks;
  sel.host_homed_far_share = off_gpu == 0 ? 1.0 : static_cast<double>(pl.host.blocks) / static_cast<double>(off_gpu);
  if (sel.topk_blocks == 0) return sel;
  const double working_set = static_cast<double>(in.model.shape.layers) * in.model.shape.kv_heads * sel.topk_blocks *
                             in.batch;
  const double cache = static_cast<double>(pl.gpu_cache_blocks);
  const double far = static_cast<double>(in.batch) * in.model.shape.layers * in.model.shape.kv_heads *
                     static_cast<double>(end - begin);
  if (pl.nvme.blocks == 0) {
    // Every home in host RAM: one LRU cache over all far blocks; re-selected
    // blocks off the GPU are in host memory, and nothing is read.
    const CacheHits hits = lru_hits(cache, far, working_set, o);
    sel.new_gpu_share = hits.new_share;
    sel.gpu_share = hits.share;
    sel.host_share = std::max(0.0, 1.0 - sel.gpu_share);
    return sel;
  }
  // NVMe homes exist. Homes fill host RAM first in token order; the GPU tier
  // evicts host-homed copies first (GpuEviction::kHomeAware), so its cache
  // holds K_n = min(C, H_n) NVMe-homed copies (a share kappa of them) and
  // host-homed ones only in the room beyond. Selections fall on either home
  // class by its share of the far blocks.
  const double hh = std::min(far, static_cast<double>(pl.host.blocks));
  const double hn = far - hh;
  const double kn = std::min(cache, hn);
  const double h = hh / far;
  sel.nvme_homed_share = 1.0 - h;
  sel.nvme_homed_cached_share = hn > 0 ? kn / hn : 1.0;
  const double kappa = sel.nvme_homed_cached_share;
  // Host-homed: an LRU cache of the rest over the host-homed far blocks.
  const CacheHits host = lru_hits(cache - kn, hh, working_set * h, o);
  // NVMe-homed, per selected block, three states: on the GPU (G), in host
  // memory only (staging, St), neither (N: read this step). A new selection
  // (1 - o) is on the GPU with kappa, staged with s, else read. A re-selected
  // one (o) keeps its GPU copy; a staged one goes up when the planner uploads
  // it (u: the executor uploads the latest host blocks first, and NVMe homes
  // are the latest tokens); last step's read is staged now. Steady state:
  //   N = (1 - o)(1 - kappa - s),  St = (o N + (1 - o) s) / (1 - o (1 - u)),  G = 1 - St - N.
  // The staging cache keeps the last S reads: R = W h' N per step, so a read
  // stays T = S / R steps, and it is in host memory only until it is
  // selected again (then it goes up): with q = W (1 - o) h' / H_n the chance
  // per step that a given NVMe-homed block is newly selected, the staging-
  // only share over its stay is phi = (1 - (1 - q)^T) / (T q), and
  //   s = min(1 - kappa, S phi / (H_n - K_n)),
  // solved with N by bisection (the right side falls as s rises: fewer
  // reads, a longer stay, a smaller phi).
  // One staging cache per sequence, as the executor's host_cache_bytes.
  const double staging = static_cast<double>(in.host_cache_bytes.value_or(0)) * in.batch /
                         static_cast<double>(c.block_bytes);
  double s = 0;
  if (hn > kn && staging > 0 && o < 1.0) {
    const double q = std::min(working_set * (1.0 - o) * (1.0 - h) / hn, 1.0 - 1e-12);
    const auto rhs = [&](double x) {
      const double reads = working_set * (1.0 - h) * (1.0 - o) * std::max(0.0, 1.0 - kappa - x);
      if (reads <= 0) return 0.0;  // nothing read: nothing new is staged
      const double stay = staging / reads, tq = stay * q;
      const double phi = tq > 1e-12 ? -std::expm1(stay * std::log1p(-q)) / tq : 1.0;
      return std::min(1.0 - kappa, staging * phi / (hn - kn));
    };
    double lo = 0, hi = 1.0 - kappa;  // lo - rhs(lo) <= 0 <= hi - rhs(hi)
    for (int i = 0; i < 60; ++i) {
      const double mid = 0.5 * (lo + hi);
      (mid - rhs(mid) < 0 ? lo : hi) = mid;
    }
    s = 0.5 * (lo + hi);
  }
  sel.staging_hit_share = s;
  const NvmeStates x = nvme_states(o, kappa, s, u);
  sel.new_gpu_share = h * host.new_share + (1.0 - h) * kappa;
  sel.gpu_share = h * host.share + (1.0 - h) * x.g;
  sel.nvme_share = (1.0 - h) * x.n;
  sel.host_share = std::max(0.0, 1.0 - sel.gpu_share - sel.nvme_share);
  return sel;
}

// Staged NVMe-homed blocks per selection list, of the selection model.
double staged_per_list(const SelectionModel& sel) {
  return sel.topk_blocks * sel.nvme_homed_share *
         nvme_states(sel.overlap, sel.nvme_homed_cached_share, sel.staging_hit_share, sel.staged_upload_share).staged;
}

// Count for list i of n when the lists share a fractional mean `per_list`:
// floor((i+1) x) - floor(i x), so the total over the lists is floor(n x).
uint32_t spread(double per_list, uint64_t i) {
  return static_cast<uint32_t>(std::floor(per_list * static_cast<double>(i + 1) + 1e-9) -
                               std::floor(per_list * static_cast<double>(i) + 1e-9));
}

std::vector<SequenceStep> modeled_batch(const SimInputs& in, const SelectionModel& sel, bool tail_completed,
                                        bool tail_to_nvme) {
  const uint32_t kv = in.model.shape.kv_heads;
  const uint32_t far_begin = far_range(in.context_tokens, in.policy).first;
  const double k = sel.topk_blocks;
  std::vector<SequenceStep> batch(in.batch);
  for (uint32_t s = 0; s < in.batch; ++s) {
    SequenceStep& seq = batch[s];
    seq.context_tokens = in.context_tokens;
    seq.tail_block_completed = tail_completed;
    seq.tail_home_on_nvme = tail_to_nvme;
    seq.selected.resize(kv);
    for (uint32_t h = 0; h < kv; ++h) {
      const uint64_t list = uint64_t{s} * kv + h;
      const uint32_t gpu = std::min<uint32_t>(sel.topk_blocks, spread(k * sel.gpu_share, list));
      const uint32_t nvme = std::min<uint32_t>(sel.topk_blocks - gpu, spread(k * sel.nvme_share, list));
      for (uint32_t j = 0; j < sel.topk_blocks; ++j) {
        const Residency where = j < gpu ? Residency::kGpu : j < gpu + nvme ? Residency::kNvme : Residency::kHost;
        seq.selected[h].push_back({far_begin + j, where});
      }
    }
  }
  return batch;
}

// On the CPU stand-in the "GPU" kernels and the copies (memcpy) run on the
// host's cores with the CPU lane's work: one queue, in the plan's order. The
// NVMe lane stays apart (io_uring runs beside the cores).
void on_cpu_standin(LayerPlan& plan) {
  for (Task& t : plan.tasks)
    if (t.lane == Lane::kGpu || t.lane == Lane::kCopyH2d || t.lane == Lane::kCopyD2h) t.lane = Lane::kCpu;
  std::vector<double> finish;
  plan.estimated_us = lane_schedule(plan.tasks, finish);
}

// One layer's plan with the tail block completed or not.
Result<LayerPlan> plan_one(const SimInputs& in, const SelectionModel& sel, const Capacity& c, const CostRates& rates,
                           bool tail_completed) {
  const std::vector<SequenceStep> batch = modeled_batch(in, sel, tail_completed, c.placement.nvme.blocks > 0);
  uint64_t resident = 0;
  for (const SequenceStep& s : batch)
    for (const auto& list : s.selected)
      for (const SelectedBlock& b : list) resident += b.where == Residency::kGpu;
  const uint64_t per_layer_slots = c.placement.gpu_cache_blocks / in.model.shape.layers;
  PlanInputs p;
  p.shape = in.model.shape;
  p.policy = in.policy;
  p.batch = batch;
  p.rates = rates;
  p.late = in.late;
  p.score_on_gpu = c.placement.gpu_summary_bytes > 0;
  p.upload_slots_free =
      static_cast<uint32_t>(std::min<uint64_t>(per_layer_slots > resident ? per_layer_slots - resident : 0, 1u << 30));
  KVT_ASSIGN_OR_RETURN(LayerPlan plan, plan_layer(p));
  if (in.machine.gpu.cpu_standin) on_cpu_standin(plan);
  return plan;
}

// Per-lane busy time, task kinds' bytes: one layer, weighted by `w`.
struct StepSums {
  std::array<double, 5> lane_busy_us{};
  double makespan_us = 0, late_blocks = 0;
  double gpu_kv = 0, host_ram = 0, h2d = 0, d2h = 0, nvme_read = 0, nvme_write = 0;

  void add(const LayerPlan& plan, double w) {
    makespan_us += w * plan.estimated_us;
    late_blocks += w * plan.late_blocks;
    for (const Task& t : plan.tasks) {
      lane_busy_us[static_cast<size_t>(t.lane)] += w * t.cost_us;
      const double b = w * static_cast<double>(t.bytes);
      switch (t.kind) {
        case TaskKind::kGpuAttendHot:
        case TaskKind::kGpuAttendSelected: gpu_kv += b; break;
        case TaskKind::kScore: (t.lane == Lane::kGpu ? gpu_kv : host_ram) += b; break;
        case TaskKind::kCpuAttend: host_ram += b; break;
        case TaskKind::kUpload: h2d += b, host_ram += b; break;
        case TaskKind::kNvmeRead: nvme_read += b; break;
        case TaskKind::kWriteBack: (t.lane == Lane::kNvme ? nvme_write : d2h) += b; break;
        default: break;
      }
    }
  }
};

constexpr std::array<Lane, 5> kLanes{Lane::kCpu, Lane::kGpu, Lane::kCopyH2d, Lane::kCopyD2h, Lane::kNvme};

LaneUse busiest(const std::vector<LaneUse>& lanes) {
  return *std::max_element(lanes.begin(), lanes.end(),
                           [](const LaneUse& a, const LaneUse& b) { return a.busy_us < b.busy_us; });
}

double utilisation(double busy, double span) { return span > 0 ? std::min(1.0, busy / span) : 0.0; }

Status add_decode(const SimInputs& in, PlanReport& r) {
  const double chunk = in.policy.chunk_tokens;
  // Where NVMe homes exist, the share of staged blocks going up is the
  // planner's choice: iterate the selection model with the planner's uploads
  // (per list, of the open-tail plan) until they agree.
  KVT_ASSIGN_OR_RETURN(LayerPlan open_tail, plan_one(in, r.selection, r.cap, r.rates, false));
  for (int i = 0; i < 16 && r.selection.nvme_homed_share > 0 && !r.selection.measured; ++i) {
    double uploads = 0;
    for (const HeadPlan& h : open_tail.heads) uploads += static_cast<double>(h.upload.size());
    uploads /= static_cast<double>(std::max<size_t>(open_tail.heads.size(), 1));
    const double staged = staged_per_list(r.selection);
    const double u = staged > 0 ? std::min(1.0, uploads / staged) : 1.0;
    if (std::abs(u - r.selection.staged_upload_share) < 1e-3) break;
    r.selection = model_selection(in, r.cap, 0.5 * (u + r.selection.staged_upload_share));
    KVT_ASSIGN_OR_RETURN(open_tail, plan_one(in, r.selection, r.cap, r.rates, false));
  }
  KVT_ASSIGN_OR_RETURN(const LayerPlan full_tail, plan_one(in, r.selection, r.cap, r.rates, true));
  // One step in chunk_tokens completes the tail block: average the two plans.
  StepSums sums;
  sums.add(open_tail, 1.0 - 1.0 / chunk);
  sums.add(full_tail, 1.0 / chunk);
  const double layers = in.model.shape.layers;
  r.step_us_attention = layers * sums.makespan_us;
  r.late_blocks_per_step = layers * sums.late_blocks;
  for (Lane lane : kLanes) {
    const double busy = layers * sums.lane_busy_us[static_cast<size_t>(lane)];
    r.lanes.push_back({std::string(lane_name(lane)), busy, utilisation(busy, r.step_us_attention)});
  }
  r.bottleneck = busiest(r.lanes);
  // Full model: weights stream from HBM while the batch's GEMMs run; the
  // slower of the two (a roofline) is added to the attention step, because
  // each layer's projections and attention run one after the other.
  const MachineProfile& m = in.machine;
  const double weights_us = static_cast<double>(in.model.weights_bytes) / (m.gpu.hbm_read_gbps * 1e3);
  const double gemm_us = 2.0 * static_cast<double>(in.model.parameters) * in.batch / (m.gpu.bf16_tflops * 1e6);
  const double dense_us = std::max(weights_us, gemm_us);
  r.step_us_full_model = r.step_us_attention + dense_us;
  r.decode_tokens_per_s_attention = in.batch / (r.step_us_attention * 1e-6);
  r.decode_tokens_per_s_full_model = in.batch / (r.step_us_full_model * 1e-6);
  std::vector<LaneUse> full = r.lanes;
  for (LaneUse& l : full) {
    if (l.lane == "gpu") l.busy_us += dense_us;
    l.utilisation = utilisation(l.busy_us, r.step_us_full_model);
  }
  r.bottleneck_full_model = busiest(full);
  Traffic& t = r.traffic;
  auto whole = [&](double per_layer) { return static_cast<uint64_t>(std::llround(per_layer * layers)); };
  t.gpu_hbm_kv_bytes = whole(sums.gpu_kv);
  t.gpu_hbm_weights_bytes = in.model.weights_bytes;
  t.host_ram_bytes = whole(sums.host_ram);
  t.pcie_h2d_bytes = whole(sums.h2d);
  t.pcie_d2h_bytes = whole(sums.d2h);
  t.nvme_read_bytes = whole(sums.nvme_read);
  t.nvme_write_bytes = whole(sums.nvme_write);
  return Status::ok_status();
}

// Prefill of one sequence, query block by query block, as the executor runs
// it (scheduler/executor.cpp): per block and layer, first the front on the
// host (the block's K/V staged into completed chunks, their copies to the GPU
// tier, their summaries), then two things at once: the mean query scored
// against every far summary on the CPU followed by block-sparse attention on
// the GPU, and behind them the home write of the completed chunks (host homes
// by memcpy, the rest to NVMe). A block takes front + the longer of the two.
// Prefill's NVMe home writes: a query block's new chunks of one KV head are
// adjacent in the file, and the store hands them to the file in file order
// from one buffer, which writes them in requests of up to
// kFileWriteRequestBytesMax, kFileBatchBlocks blocks a batch
// (storage/block_file.h), at most the device's queue depth in flight.
uint64_t prefill_write_request(const SimInputs& in, const PlanReport& r) {
  const uint64_t run = std::max<uint64_t>(1, in.constants.prefill_query_block_tokens / in.policy.chunk_tokens);
  return std::min(storage::kFileWriteRequestBytesMax, run * r.cap.block_bytes);
}

uint32_t prefill_write_depth(const SimInputs& in, const PlanReport& r) {
  const uint64_t per_batch = storage::kFileBatchBlocks * r.cap.block_bytes / prefill_write_request(in, r);
  return static_cast<uint32_t>(std::clamp<uint64_t>(per_batch, 1, in.constants.nvme_queue_depth));
}

void add_prefill(const SimInputs& in, PlanReport& r) {
  const ModelShape& s = in.model.shape;
  const SparsityPolicy& p = in.policy;
  const MachineProfile& m = in.machine;
  const SimConstants& k = in.constants;
  const double kvpt = static_cast<double>(s.kv_bytes_per_token());
  const double flops = m.gpu.bf16_tflops * 1e12;
  // The CPU stand-in's bf16_tflops is its measured prefill attention rate.
  const bool standin = m.gpu.cpu_standin;
  const double attend_flops = (standin ? 1.0 : k.prefill_attention_fraction) * flops;
  const double big_h2d = m.link.gbps_at(LinkDirection::kHostToDevice, k.link_large_copy_bytes) * 1e9;
  const double nvme_write = m.nvme.write_gbps_at(prefill_write_request(in, r), prefill_write_depth(in, r)) * 1e9;
  // A host copy reads and writes each byte: half the read bandwidth.
  const double host_copy = m.host.read_gbps * 1e9 / 2;
  const double score = m.host.score_gbps * 1e9;
  const double stage = m.host.prefill_stage_gbps * 1e9;
  const double query = m.host.prefill_query_gbps * 1e9;
  const double row = static_cast<double>(summary_row_bytes(s, p.summary_kind));
  const double lists = static_cast<double>(s.layers) * s.kv_heads;
  const double q_row_bytes = static_cast<double>(s.q_heads) * s.head_dim * 2 * s.layers;  // bf16 q of a token
  // Tokens of this sequence whose home is host RAM: the first ones written,
  // up to the host budget. Every full block has a home (DESIGN.md 2), also
  // those the GPU caches, so this is the budget, not the placement's host tier.
  const double host_tokens = static_cast<double>(r.cap.placement.host_budget_bytes / r.cap.block_bytes) /
                             (lists * in.batch) * p.chunk_tokens;
  // Tokens of far blocks the GPU block cache holds, and the fetch rates.
  const double gpu_cache_tokens =
      static_cast<double>(r.cap.placement.gpu_cache_blocks) / (lists * in.batch) * p.chunk_tokens;
  const double block = static_cast<double>(r.cap.block_bytes);
  const double nvme_read = m.nvme.read_gbps_at(r.cap.block_bytes, k.nvme_queue_depth) * 1e9;
  std::array<double, 5> busy{};  // seconds, by Lane
  double total = 0, total_attention = 0;
  for (uint64_t start = 0; start < in.context_tokens; start += k.prefill_query_block_tokens) {
    const double q = static_cast<double>(std::min(k.prefill_query_block_tokens, in.context_tokens - start));
    const double before = static_cast<double>(start);
    const double window = std::min(before, static_cast<double>(p.window_tokens));
    const double sinks = std::min(static_cast<double>(p.sink_tokens), std::max(0.0, before - window));
    const double far_tokens = std::max(0.0, before - window - sinks);
    const double selected = std::min(far_tokens, static_cast<double>(p.topk_chunks) * p.chunk_tokens);
    const double pairs = q * (q + 1) / 2 + q * (window + sinks + selected);  // per q head and layer
    const double far_blocks = far_tokens / p.chunk_tokens;
    const double bytes = q * kvpt;  // the block's K/V, all layers
    // The selected far blocks must be in GPU slots before attention: those
    // the block cache does not hold are fetched (NVMe-homed ones read first).
    const double selected_blocks = std::min(far_blocks, static_cast<double>(p.topk_chunks)) * lists;
    const double cached_share = before > 0 ? std::min(1.0, gpu_cache_tokens / before) : 1.0;
    const double nvme_share = before > 0 ? std::max(0.0, before - host_tokens) / before : 0.0;
    const double fetched = selected_blocks * (1 - cached_share);
    const double fetch_h2d = fetched * block / big_h2d;
    const double fetch_nvme = fetched * nvme_share * block / nvme_read;
    // Front: the executor's staging of the block's K/V (append, summaries,
    // home writes started, at the calibrated rate), and its GPU copies.
    const double front_cpu = bytes / stage;
    const double front_h2d = bytes / big_h2d;
    // Then: the query pass (the block's q averaged and staged for upload,
    // scoring and top-k at the calibrated rate; far summaries beyond those
    // the calibration scored at the scoring rate) and attention ...
    const double scoring = q * q_row_bytes / query + far_blocks * lists * row / score;
    const double weights_s = 2.0 * static_cast<double>(in.model.parameters) * q / flops;
    const double attention = 4.0 * s.head_dim * s.q_heads * pairs * s.layers / attend_flops;
    // ... beside the home write of the block's chunks: host homes copied, the rest to NVMe.
    const double to_nvme = std::clamp(before + q - std::max(before, host_tokens), 0.0, q);
    const double home_host = (q - to_nvme) * kvpt / host_copy;
    const double home_nvme = to_nvme * kvpt / nvme_write;
    // On the CPU stand-in the copies and the "GPU" work are the cores' too.
    busy[static_cast<size_t>(Lane::kCpu)] += front_cpu + scoring + home_host;
    busy[static_cast<size_t>(standin ? Lane::kCpu : Lane::kCopyH2d)] += front_h2d + fetch_h2d;
    busy[static_cast<size_t>(standin ? Lane::kCpu : Lane::kGpu)] += attention + weights_s;
    busy[static_cast<size_t>(Lane::kNvme)] += home_nvme + fetch_nvme;
    const double front = front_cpu + front_h2d;
    const double fetch = fetch_nvme + fetch_h2d;
    // The home writes share the drive with the fetch's reads. Host homes are
    // copied by the CPU workers; on the CPU stand-in those also run the
    // attention, so the copies join the chain instead of running beside it.
    const double chain_extra = standin ? home_host : 0.0;
    const double behind = (standin ? 0.0 : home_host) + home_nvme + fetch_nvme;
    const double chain = scoring + fetch + attention + chain_extra;
    total += front + std::max(chain + weights_s, behind);
    total_attention += front + std::max(chain, behind);
    PlanReport::PrefillParts& parts = r.prefill_parts;
    parts.stage += front;
    parts.query += scoring;
    parts.fetch += fetch;
    parts.attention += attention + chain_extra;
    parts.home_write_exposed += std::max(0.0, behind - chain);
  }
  r.prefill_seconds = total;
  r.prefill_seconds_attention = total_attention;
  size_t top = static_cast<size_t>(std::max_element(busy.begin(), busy.end()) - busy.begin());
  r.prefill_bottleneck = {std::string(lane_name(kLanes[top])), busy[top] * 1e6, utilisation(busy[top], total)};
}

void add_assumptions(const SimInputs& in, PlanReport& r) {
  const SimConstants& k = in.constants;
  const MachineProfile& m = in.machine;
  const SelectionModel& sel = r.selection;
  auto& a = r.assumptions;
  a.push_back("every sequence of the batch has its own context of context_tokens (no shared prefix); kv_bytes = "
              "batch x layers x kv_heads x ceil(context / chunk_tokens) blocks x block_bytes (" +
              std::to_string(r.cap.block_bytes) + " B)");
  a.push_back("summaries: one " + std::string(summary_kind_name(in.policy.summary_kind)) +
              " row per block and KV head, held in host RAM");
  a.push_back(r.cap.placement.gpu_summary_bytes > 0
                  ? "decode scoring on the GPU: the mean keys (" +
                        gib(static_cast<double>(r.cap.placement.gpu_summary_bytes)) +
                        ") are mirrored in the GPU budget, scored at gpu_attend_gbps ahead of the hot set (plus "
                        "launch_us), and the scores (4 B a block) come down at d2h_gbps (plus launch_us) for the "
                        "CPU's top-k"
                  : "decode scoring on the CPU at cpu_score_gbps (" +
                        std::string(m.gpu.cpu_standin ? "the GPU is the CPU stand-in"
                                    : in.score_on_gpu ? "the summaries are not mean keys, or their copy would take "
                                                        "more than a quarter of the GPU budget"
                                                      : "GPU scoring switched off") +
                        ")");
  a.push_back("weights: " + in.model.name + " bf16, " + gib(static_cast<double>(in.model.weights_bytes)) +
              ", held in GPU memory");
  a.push_back(in.gpu_budget_bytes ? "GPU budget for KV given: " + gib(static_cast<double>(*in.gpu_budget_bytes))
                                  : "GPU budget for KV = GPU memory - weights - reserve (" +
                                        format_bytes(static_cast<uint64_t>(k.gpu_reserve_bytes_fixed)) + " + " + num(100 * k.gpu_reserve_fraction) +
                                        "% of GPU memory for activations, workspace and the CUDA context)");
  a.push_back("hot set on the GPU per (sequence, layer, KV head): ceil(sink/chunk) + ceil(window/chunk) + 1 "
              "blocks (the +1: an unaligned window spans one more block); the rest of the GPU budget is a block "
              "cache for far blocks");
  a.push_back(in.host_budget_bytes ? "host budget for KV blocks given: " +
                                         gib(static_cast<double>(*in.host_budget_bytes))
                                   : "host budget for KV blocks = " + num(100 * k.host_budget_fraction) +
                                         "% of host RAM - summaries");
  a.push_back("placement counts each block once, at the fastest tier holding it (GPU, then host, then NVMe); the "
              "NVMe file must also hold the homes of GPU-held blocks once NVMe is used at all (DESIGN.md 2: homes "
              "are host or NVMe), which nvme_home_bytes includes; the GPU tier evicts host-homed copies first, so the "
              "NVMe-homed blocks it caches stay there (storage GpuEviction::kHomeAware)");
  if (sel.measured) {
    a.push_back("selection statistics GIVEN (measured), not modeled: of each step's selected blocks " +
                num(sel.gpu_share) + " GPU-resident, " + num(sel.nvme_share) + " read from NVMe, " +
                num(sel.host_share) + " in host memory (the staging and cache models are not used); all NVMe "
                "reads are issued after top-k (no prefetch for future steps)");
  } else {
    a.push_back("selection statistics are MODELED, not measured from a trace: step-to-step top-k overlap o = " +
                num(sel.overlap) +
                (in.selection_overlap ? " (given)" : " (default: measured by the synthetic model at query "
                                                     "correlation 0.9, 64K context)") +
                "; per step and KV head topk x (1 - o) selected blocks are new");
    if (sel.nvme_homed_share == 0) {
      a.push_back("GPU-resident share of the selection = min(1, gpu_cache_blocks / W) x o + (1 - o) x n = " +
                  num(sel.gpu_share) + ", W = layers x kv_heads x topk x batch: the last step's selection is assumed "
                  "uploaded or kept on the GPU while the cache holds it (the planner may instead attend some host "
                  "blocks on the CPU, so this is optimistic about GPU hits), and a new selection is in the cache with "
                  "n = (gpu_cache_blocks - W) / (far blocks - W) = " + num(sel.new_gpu_share) +
                  ", the share of the other far blocks the rest of the cache holds (no reuse beyond one step "
                  "modeled); every home is in host RAM, so nothing is read from NVMe");
    } else {
      a.push_back("NVMe homes exist: homes fill host RAM first in token order, and the GPU tier evicts host-homed "
                  "copies first (home-aware), so its cache holds K_n = min(C, H_n) NVMe-homed copies, kappa = K_n / "
                  "H_n = " + num(sel.nvme_homed_cached_share) + " of the NVMe-homed far blocks (a share h' = " +
                  num(sel.nvme_homed_share) + " of the far blocks, which the selection hits alike), and host-homed "
                  "ones only in the room beyond (an LRU cache over the host-homed blocks, as without NVMe)");
      a.push_back("per selected NVMe-homed block, states GPU (G), staged in host memory only (St) and read this step "
                  "(N): a new selection (1 - o) is on the GPU with kappa, staged with s, else read; a re-selected one "
                  "keeps its GPU copy, goes up from staging with u (the executor uploads the latest host blocks "
                  "first and NVMe homes hold the latest tokens), and last step's reads are staged; steady state N = "
                  "(1 - o)(1 - kappa - s), St = (o N + (1 - o) s) / (1 - o (1 - u)), G = 1 - St - N; s = min(1 - "
                  "kappa, S phi / (H_n - K_n)) = " + num(sel.staging_hit_share) + " with S the staging cache's "
                  "blocks (" + (in.host_cache_bytes ? format_bytes(*in.host_cache_bytes) + " given" :
                                std::string("none given: only last step's reads are staged")) +
                  ") and phi the share of its reads not selected again since (then they went up): a read stays S / R "
                  "steps (R = W h' N reads per step), and a given NVMe-homed block is newly selected with q = W (1 - "
                  "o) h' / H_n per step, phi = (1 - (1 - q)^(S/R)) / ((S/R) q), solved with N by bisection; the "
                  "staging cache is taken as in steady state (a short run after prefill may still hold prefill's "
                  "blocks there); u = " + num(sel.staged_upload_share) +
                  " from the planner's uploads per list over the staged blocks per list (iterated to agree)");
      a.push_back("GPU-resident share of the selection = " + num(sel.gpu_share) + ", from NVMe = " +
                  num(sel.nvme_share) + ", from host memory = " + num(sel.host_share) +
                  "; no prefetch of NVMe blocks for future steps is modeled (all NVMe reads are issued after top-k)");
    }
  }
  a.push_back("decode: layers run one after another (each layer's query depends on the previous layer's "
              "output), all layers alike: one layer is planned by the real planner and its lane-schedule makespan "
              "is multiplied by layers; the tail block completes one step in chunk_tokens (plans with and without "
              "write-back averaged 1:" + std::to_string(in.policy.chunk_tokens - 1) + ")");
  if (in.late == LatePolicy::kSummary)
    a.push_back("late=summary: a selected NVMe block whose read cannot land before the rest of the step ends "
                "contributes its summary; its read holds the drive (the nvme lane's busy time) but the step "
                "neither waits for it nor ends with it, as in the executor, where it lands for later steps");
  if (m.gpu.cpu_standin)
    a.push_back("the GPU is kvtier's CPU stand-in (gpu.cpu_standin): its kernels run on the host's cores, so in "
                "decode the gpu and copy lanes' tasks join the cpu lane's queue in the plan's order (the lanes "
                "report them as cpu), gpu_attend_gbps = hbm_read_gbps (its measured attention rate, no kernel "
                "curve), uploads and write-backs are memcpy at the link's rates; in prefill its attention runs at "
                "bf16_tflops as measured (no kernel fraction) and the copies to host homes join the block's chain "
                "instead of running beside it; the full-model figures price weights and GEMMs at the stand-in's "
                "attention rates, though kvtier's stand-in runs no model");
  else
    a.push_back("gpu_attend_gbps = hbm_read_gbps x " + num(gpu_attend_fraction(in.batch)) +
                ": the decode kernel's measured share of the HBM copy rate at this batch (H200: 0.394 at batch 1, "
                "0.764 at 4, 0.981 at 16, 130 blocks per (sequence, KV head); linear in log2(batch) between, "
                "clamped), bench/results/2026-11-28-gpu-h200-tc.json; hot-set and selected-block kernels are "
                "costed separately at the same rate");
  a.push_back("h2d_gbps = " + num(k.gather_fraction_of_copy) + " x the link's single-copy rate at " +
              format_bytes(k.link_large_copy_bytes) +
              ": uploads are gathered in one batch (measured gather of 32 KiB blocks: 0.897 of one 32 MiB copy); "
              "d2h_gbps from the link curve at one layer's completed blocks as one copy; the duplex factor is not "
              "applied");
  a.push_back("nvme read/write rates from the drive's table at " + std::to_string(r.cap.block_bytes) +
              " B requests and queue depth " + std::to_string(k.nvme_queue_depth) + "; latency " +
              num(m.nvme.latency_us) + " us per read batch");
  a.push_back("cpu_attend_gbps = host.attend_gbps, cpu_score_gbps = host.score_gbps (all cores), cpu_topk_gbps = "
              "host.topk_gbps (decode's top-k, 4 bytes a far block); each in-step CPU "
              "attention call (host blocks, each round of " + std::to_string(kReadRoundBlocks) +
              " NVMe reads, the far field) costs host.attend_call_us = " + num(m.host.attend_call_us) +
              " us more");
  a.push_back("launch_us = " + num(k.launch_us) + " per kernel or copy batch (merge kernel measured ~5 us)");
  a.push_back("the executor's own host time per layer step, serial with the devices (host profile, from kvtier "
              "calibrate running the executor): prepare " + num(m.host.prepare_us_per_list) +
              " us per (sequence, KV head) before scoring, plan " + num(m.host.plan_us_per_block) +
              " us per selected block between top-k and the devices (under late=wait the NVMe reads go out after "
              "its first " + num(kPlanCensusShare * 100) + "%, the residency census, as the executor issues them), and " +
              num(m.host.step_overhead_us) +
              " us per layer step after the merge (hand-offs, scoring beyond score_gbps, write-back bookkeeping); "
              "measured with every selected block GPU-resident, so pins, uploads and read issue of blocks "
              "elsewhere may cost more");
  a.push_back("full model: per step, the weights are read once at hbm_read_gbps while the batch's GEMMs (2 x "
              "parameters x batch FLOPs) run at bf16_tflops; the slower of the two is added to the attention "
              "step; KV append, norms and sampling are not modeled");
  a.push_back("prefill (one sequence), as the executor runs it: query blocks of " +
              std::to_string(k.prefill_query_block_tokens) +
              " tokens; per block, first the front: the block's K/V staged into chunks with their summaries at "
              "host.prefill_stage_gbps (" + num(m.host.prefill_stage_gbps) + " GB/s of K/V, the executor's "
              "measured rate) and their GPU copies (one batch at the 32 MiB h2d rate); then the query pass and "
              "scoring (the block's q averaged and staged for its upload at host.prefill_query_gbps, " +
              num(m.host.prefill_query_gbps) + " GB/s of q, and every far summary at host.score_gbps), the fetch of the selected far blocks the GPU block cache does not hold (its "
              "share of the far tokens so far; NVMe-homed ones read at the drive's block rate, then one batched "
              "upload at the 32 MiB h2d rate), then block-sparse attention, 4 x head_dim x q_heads x pairs x layers FLOPs "
              "(pairs per query: own causal + window + sinks + topk x chunk before the block) at " +
              num(k.prefill_attention_fraction) +
              (m.gpu.cpu_standin ? " x bf16_tflops on a GPU (our kernel vs cuBLAS, measured on the H200); here, "
                                   "on the CPU stand-in, at bf16_tflops as measured,"
                                 : " x bf16_tflops (our kernel vs cuBLAS, measured on the H200),") +
              " plus for the full model its GEMMs, "
              "2 x parameters x tokens at bf16_tflops; beside them the home write behind (host homes copied at "
              "host.read_gbps / 2" + (m.gpu.cpu_standin ? ", on the stand-in in the chain instead" : "") +
              ", NVMe homes, which fill after the host ones in token order, at " +
              format_bytes(prefill_write_request(in, r)) + " requests, QD " + std::to_string(prefill_write_depth(in, r)) +
              " (a KV head's new chunks are adjacent in the file; the file joins them up to " +
              format_bytes(storage::kFileWriteRequestBytesMax) + ", " + std::to_string(storage::kFileBatchBlocks) +
              " blocks a batch)), which shares the drive with the fetch's reads; a block takes front + the longer of the two; "
              "prefill_seconds sums the blocks as the context grows");
  a.push_back("bf16_tflops and hbm_read_gbps are taken from the profile as given (presets: spec sheets, which "
              "measured runs reach only in part: cuBLAS reached 0.78 of the H200's dense spec)");
  a.push_back("checked against kvtier bench e2e on one H200 host with a profile kvtier calibrate measured there "
              "in the same lease; the latest, out of sample (bench/results/2026-11-29-plan-validation-h200-v12/, "
              "docs/plan.md): decode within 15% at 3 of 6 configurations with correlated queries (worst +23%), 5 "
              "of 6 with uncorrelated ones (worst -31% at 1M, where the runs read fewer blocks from NVMe than "
              "selections spread evenly over the far blocks would: likely more reuse of staged blocks), "
              "late=summary at 2 of 6 (worst -21%), prefill "
              "at 4 of 6 (worst -25%: the NVMe home writes, taken as hidden behind the block's work, were partly "
              "waited for, and the fetch's reads took longer than modeled); the same point run twice in that "
              "lease moved by up to 28%; presets carry that host's executor times, not those of the machine "
              "asked about. On a 2-core build machine's CPU stand-in: decode within 16% where NVMe reads set "
              "the step (from errors that cancel), 21-33% slow where they do not, prefill 60-68% slow "
              "(bench/results/2026-11-29-plan-validation-build-machine/)");
}

void add_warnings(const SimInputs& in, PlanReport& r) {
  if (in.model.max_positions != 0 && in.context_tokens > in.model.max_positions)
    r.warnings.push_back(in.model.name + " was trained for " + std::to_string(in.model.max_positions) +
                         " positions; " + std::to_string(in.context_tokens) +
                         " tokens need a long-context method (RoPE scaling); the simulator models cost, not quality");
  if (!r.cap.fits)
    r.warnings.push_back("does not fit (" + r.cap.overflow_tier + "): " + r.cap.overflow_reason +
                         "; speeds are those of the same tiers had they room");
  if (r.late_blocks_per_step > 0)
    r.warnings.push_back(num(r.late_blocks_per_step) +
                         " selected blocks per step arrive late and contribute their summary only");
  for (const LaneUse& lane : r.lanes)
    if (lane.lane == lane_name(Lane::kNvme) && lane.busy_us > r.step_us_attention * 1.001)
      r.warnings.push_back("the drive needs " + num(lane.busy_us / 1e3) + " ms per " + num(r.step_us_attention / 1e3) +
                           " ms step: late blocks' reads fall behind, and the executor drops those queued more than "
                           "a step deep, so they stay late longer than modeled");
}

}  // namespace

Result<PlanReport> simulate(const SimInputs& in) {
  KVT_RETURN_IF_ERROR(check_inputs(in));
  PlanReport r;
  r.model = in.model.name;
  r.machine = in.machine.name;
  r.context_tokens = in.context_tokens;
  r.batch = in.batch;
  r.policy = in.policy;
  r.late = in.late;
  r.weights_bytes = in.model.weights_bytes;
  r.gpu_memory_bytes = in.machine.gpu.memory_bytes;
  r.cap = capacity_of(in);
  KVT_RETURN_IF_ERROR(check_host_cache(in, r.cap));
  r.max_context_tokens_that_fits = max_context_that_fits(in);
  r.rates = rates_from_profile(in.machine, in.model.shape, in.policy, in.batch, in.constants);
  KVT_RETURN_IF_ERROR(validate(r.rates).with_context("rates from machine '" + in.machine.name + "'"));
  r.selection = model_selection(in, r.cap);
  if (in.selection_shares) {
    const MeasuredSelection& m = *in.selection_shares;
    if (m.nvme_share > 0 && r.cap.placement.nvme.blocks == 0)
      return invalid_argument(std::string(kWhat) + ": selection_shares nvme=" + num(m.nvme_share) +
                              " but no block of this placement is on NVMe; give nvme=0, or budgets that put blocks "
                              "there");
    r.selection.gpu_share = m.gpu_share;
    r.selection.nvme_share = m.nvme_share;
    r.selection.host_share = std::max(0.0, 1.0 - r.selection.gpu_share - r.selection.nvme_share);
    r.selection.measured = true;
  }
  KVT_RETURN_IF_ERROR(add_decode(in, r));
  add_prefill(in, r);
  add_assumptions(in, r);
  add_warnings(in, r);
  return r;
}

namespace {

nlohmann::json tier_json(const TierPlacement& t) { return {{"bytes", t.bytes}, {"blocks", t.blocks}}; }

nlohmann::json lane_json(const LaneUse& l) {
  return {{"lane", l.lane}, {"busy_us", l.busy_us}, {"utilisation", l.utilisation}};
}

}  // namespace

nlohmann::json to_json(const PlanReport& r) {
  using nlohmann::json;
  const Placement& pl = r.cap.placement;
  json lanes = json::array();
  for (const LaneUse& l : r.lanes) lanes.push_back(lane_json(l));
  const SelectionModel& sel = r.selection;
  // The selection model's own quantities: null when the shares were given.
  const auto model_only = [&sel](double x) { return sel.measured ? json() : json(x); };
  const Traffic& t = r.traffic;
  return {
      {"model", r.model},
      {"machine", r.machine},
      {"context_tokens", r.context_tokens},
      {"batch", r.batch},
      {"policy", to_string(r.policy)},
      {"late", std::string(late_policy_name(r.late))},
      {"fits", r.cap.fits},
      {"overflow_tier", r.cap.fits ? json(nullptr) : json(r.cap.overflow_tier)},
      {"overflow_reason", r.cap.fits ? json(nullptr) : json(r.cap.overflow_reason)},
      {"max_context_tokens_that_fits", r.max_context_tokens_that_fits},
      {"kv_bytes", r.cap.kv_bytes},
      {"summary_bytes", r.cap.summary_bytes},
      {"block_bytes", r.cap.block_bytes},
      {"weights_bytes", r.weights_bytes},
      {"gpu_memory_bytes", r.gpu_memory_bytes},
      {"placement",
       {{"gpu", tier_json(pl.gpu)},
        {"host", tier_json(pl.host)},
        {"nvme", tier_json(pl.nvme)},
        {"gpu_budget_bytes", pl.gpu_budget_bytes},
        {"gpu_hot_bytes", pl.gpu_hot_bytes},
        {"gpu_cache_blocks", pl.gpu_cache_blocks},
        {"host_budget_bytes", pl.host_budget_bytes},
        {"nvme_home_bytes", pl.nvme_home_bytes},
        {"gpu_summary_bytes", pl.gpu_summary_bytes}}},
      {"decode_scoring", pl.gpu_summary_bytes > 0 ? "gpu" : "cpu"},
      {"selection",
       {{"source", sel.measured ? "given (measured)" : "modeled"},
        {"overlap", sel.overlap},
        {"topk_blocks", sel.topk_blocks},
        {"gpu_share", sel.gpu_share},
        {"host_share", sel.host_share},
        {"nvme_share", sel.nvme_share},
        {"host_homed_far_share", sel.host_homed_far_share},
        {"nvme_homed_share", sel.nvme_homed_share},
        {"nvme_homed_cached_share", model_only(sel.nvme_homed_cached_share)},
        {"staging_hit_share", model_only(sel.staging_hit_share)},
        {"staged_upload_share", model_only(sel.staged_upload_share)}}},
      {"rates",
       {{"gpu_attend_gbps", r.rates.gpu_attend_gbps},
        {"cpu_attend_gbps", r.rates.cpu_attend_gbps},
        {"cpu_score_gbps", r.rates.cpu_score_gbps},
        {"cpu_topk_gbps", r.rates.cpu_topk_gbps},
        {"h2d_gbps", r.rates.h2d_gbps},
        {"d2h_gbps", r.rates.d2h_gbps},
        {"nvme_read_gbps", r.rates.nvme_read_gbps},
        {"nvme_write_gbps", r.rates.nvme_write_gbps},
        {"nvme_latency_us", r.rates.nvme_latency_us},
        {"launch_us", r.rates.launch_us}}},
      {"decode_step_us", {{"attention_tiering", r.step_us_attention}, {"full_model", r.step_us_full_model}}},
      {"decode_tokens_per_s",
       {{"attention_tiering", r.decode_tokens_per_s_attention}, {"full_model", r.decode_tokens_per_s_full_model}}},
      {"late_blocks_per_step", r.late_blocks_per_step},
      {"prefill_seconds", r.prefill_seconds},
      {"prefill_seconds_attention", r.prefill_seconds_attention},
      {"prefill_bottleneck", {{"lane", r.prefill_bottleneck.lane}, {"utilisation", r.prefill_bottleneck.utilisation}}},
      {"prefill_parts_seconds",
       {{"stage", r.prefill_parts.stage},
        {"query", r.prefill_parts.query},
        {"fetch", r.prefill_parts.fetch},
        {"attention", r.prefill_parts.attention},
        {"home_write_exposed", r.prefill_parts.home_write_exposed}}},
      {"bottleneck", {{"lane", r.bottleneck.lane}, {"utilisation", r.bottleneck.utilisation}}},
      {"bottleneck_full_model",
       {{"lane", r.bottleneck_full_model.lane}, {"utilisation", r.bottleneck_full_model.utilisation}}},
      {"lanes", lanes},
      {"traffic_per_step",
       {{"gpu_hbm_kv_bytes", t.gpu_hbm_kv_bytes},
        {"gpu_hbm_weights_bytes", t.gpu_hbm_weights_bytes},
        {"host_ram_bytes", t.host_ram_bytes},
        {"pcie_h2d_bytes", t.pcie_h2d_bytes},
        {"pcie_d2h_bytes", t.pcie_d2h_bytes},
        {"nvme_read_bytes", t.nvme_read_bytes},
        {"nvme_write_bytes", t.nvme_write_bytes}}},
      {"assumptions", r.assumptions},
      {"warnings", r.warnings},
  };
}

}  // namespace kvtier::scheduler
