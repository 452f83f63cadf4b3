#include "kvtier/runtime/session.h"

#include <sstream>
#include <system_error>

#include "kvtier/core/block.h"
#include "kvtier/core/log.h"
#include "kvtier/core/sizes.h"
#include "kvtier/cpu/cpu_backend.h"
#include "kvtier/cpu/engine.h"
#include "kvtier/cpu/topology.h"
#include "kvtier/gpu/cuda_backend.h"
#include "kvtier/gpu/cuda_context.h"
#include "kvtier/gpu/device_query.h"
#include "kvtier/storage/device_arena.h"

namespace kvtier::runtime {

struct Engine::Impl {
  EngineOptions options;
  std::unique_ptr<ComputeBackend> backend;
  std::unique_ptr<gpu::CudaContext> cuda;
  std::unique_ptr<cpu::CpuEngine> cpu;
  std::shared_ptr<storage::DeviceArena> arena;
  std::unique_ptr<scheduler::Executor> executor;
  int numa_node = -1;
  std::string rates_source;
};

namespace {

// Rates the cost model starts from when none were measured (kvtier calibrate
// measures them); they only steer the CPU/GPU split and late-block decisions.
scheduler::CostRates default_rates(bool cuda) {
  scheduler::CostRates r;
  if (cuda) {  // H200 host figures from bench/results/2026-11-28-calibrate-h200.json, rounded
    r.gpu_attend_gbps = 2500;
    r.cpu_attend_gbps = 70;
    r.cpu_score_gbps = 70;
    r.cpu_topk_gbps = 3;
    r.h2d_gbps = 40;
    r.d2h_gbps = 40;
  } else {  // the CPU stand-in: "uploads" are memcpy and the "GPU" is the CPU
    r.gpu_attend_gbps = 25;
    r.cpu_attend_gbps = 25;
    r.cpu_score_gbps = 40;
    r.cpu_topk_gbps = 3;
    r.h2d_gbps = 10;
    r.d2h_gbps = 10;
  }
  r.nvme_read_gbps = 1.0;
  r.nvme_write_gbps = 1.0;
  r.nvme_latency_us = 150;
  r.launch_us = 8;
  return r;
}

Status check_options(const EngineOptions& o) {
  KVT_RETURN_IF_ERROR(validate(o.shape));
  KVT_RETURN_IF_ERROR(validate(o.policy));
  if (o.gpu_bytes == 0) return invalid_argument("engine: gpu_bytes=0; give the gpu tier a budget (--gpu-bytes)");
  if (o.host_bytes == 0) return invalid_argument("engine: host_bytes=0; give the host tier a budget (--host-bytes)");
  if (o.host_cache_bytes > o.host_bytes)
    return invalid_argument("engine: host_cache_bytes=" + format_bytes(o.host_cache_bytes) + " exceeds host_bytes=" +
                            format_bytes(o.host_bytes) + "; the staging cache is part of the host budget");
  if (o.nvme_dir.empty()) return invalid_argument("engine: no nvme directory; give one with --dir");
  std::error_code ec;
  if (!std::filesystem::is_directory(o.nvme_dir, ec))
    return not_found("engine: nvme directory " + o.nvme_dir.string() + " does not exist or is not a directory; create it or pass another --dir");
  if (o.rates) KVT_RETURN_IF_ERROR(validate(*o.rates));
  return Status::ok_status();
}

}  // namespace

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() {
  if (impl_ && impl_->cuda) (void)impl_->cuda->synchronize_device();
}

Result<std::unique_ptr<Engine>> Engine::create(const EngineOptions& options) {
  KVT_RETURN_IF_ERROR(check_options(options));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (options.device != DeviceChoice::kCpu) {
    Result<std::unique_ptr<gpu::CudaContext>> ctx = gpu::CudaContext::create(options.cuda_device);
    Result<std::unique_ptr<ComputeBackend>> backend =
        ctx.ok() ? gpu::make_cuda_backend(options.cuda_device) : Result<std::unique_ptr<ComputeBackend>>(ctx.status());
    if (ctx.ok() && backend.ok()) {
      const uint32_t group = options.shape.q_heads / options.shape.kv_heads;
      const bool kernels_fit = (options.shape.head_dim == 64 || options.shape.head_dim == 128) &&
                               (group == 1 || group == 2 || group == 4 || group == 8);
      if (!kernels_fit) {
        const std::string why = "the GPU kernels support head_dim 64/128 and GQA groups 1/2/4/8; this shape has head_dim " +
                                std::to_string(options.shape.head_dim) + " and group " + std::to_string(group);
        if (options.device == DeviceChoice::kCuda) return unsupported("engine: " + why + "; use --device cpu");
        KVT_LOG_WARN("engine: ", why, "; running on the CPU backend");
      } else {
        impl->cuda = std::move(ctx).value();
        impl->backend = std::move(backend).value();
        Result<std::vector<gpu::GpuDevice>> gpus = gpu::list_gpus();
        if (gpus.ok() && static_cast<size_t>(options.cuda_device) < gpus->size()) {
          Result<std::optional<uint32_t>> node = cpu::numa_node_of_pci((*gpus)[options.cuda_device].pci_bus_id);
          if (node.ok() && node->has_value()) impl->numa_node = static_cast<int>(**node);
        }
      }
    } else if (options.device == DeviceChoice::kCuda) {
      return (ctx.ok() ? backend.status() : ctx.status()).with_context("engine: --device cuda");
    }
  }
  if (impl->backend == nullptr) impl->backend = cpu::make_cpu_backend();
  cpu::EngineOptions eo;
  eo.threads = options.cpu_threads;
  eo.numa_node = impl->numa_node;
  KVT_ASSIGN_OR_RETURN(impl->cpu, cpu::CpuEngine::create(eo));
  const BlockGeometry g(options.shape, options.policy.chunk_tokens);
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<storage::DeviceArena> arena,
                       storage::DeviceArena::create(*impl->backend, options.gpu_bytes, g.slot_bytes()));
  impl->arena = std::move(arena);
  scheduler::ExecutorOptions xo;
  xo.shape = options.shape;
  xo.policy = options.policy;
  xo.rates = options.rates ? *options.rates : default_rates(impl->cuda != nullptr);
  impl->rates_source = options.rates ? "given" : "built-in estimates (kvtier calibrate measures real ones)";
  xo.late = options.late;
  xo.warm_workers = options.warm_workers;
  xo.gpu_eviction = options.gpu_eviction;
  xo.home_write_batch_blocks = options.home_write_batch_blocks;
  xo.score_on_gpu = options.score_on_gpu;
  xo.poll_reads = options.poll_reads;
  xo.drop_optional_reads = options.drop_optional_reads;
  xo.early_reads = options.early_reads;
  xo.fetch_read_ahead = options.fetch_read_ahead;
  xo.max_sequences = options.max_sessions;
  xo.host_cache_bytes = options.host_cache_bytes;
  xo.trace = options.trace;
  KVT_ASSIGN_OR_RETURN(impl->executor,
                       scheduler::Executor::create(xo, *impl->backend, *impl->cpu, impl->cuda.get(), impl->arena));
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Result<std::unique_ptr<Session>> Engine::create_session(uint64_t max_tokens, const std::string& name) {
  if (name.empty() || name.find('/') != std::string::npos)
    return invalid_argument("session name '" + name + "' must be a non-empty file name without '/'");
  const std::filesystem::path path = impl_->options.nvme_dir / (name + ".kv");
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<scheduler::SequenceKv> kv,
                       impl_->executor->create_sequence(max_tokens, impl_->options.host_bytes, path, impl_->numa_node));
  auto s = std::unique_ptr<Session>(new Session(this, std::move(kv)));
  s->path_ = path;
  return s;
}

Result<std::unique_ptr<Session>> Engine::open_session(const std::filesystem::path& kv_file) {
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<scheduler::SequenceKv> kv,
                       impl_->executor->open_sequence(impl_->options.host_bytes, kv_file, impl_->numa_node));
  auto s = std::unique_ptr<Session>(new Session(this, std::move(kv)));
  s->path_ = kv_file;
  return s;
}

Status Engine::decode_layer(uint32_t layer, std::span<const DecodeRequest> batch) {
  std::vector<scheduler::DecodeItem> items;
  items.reserve(batch.size());
  for (const DecodeRequest& r : batch) {
    if (r.session == nullptr) return invalid_argument("decode: a batch entry has no session");
    if (r.session->engine_ != this) return invalid_argument("decode: a session of another engine is in the batch");
    items.push_back({r.session->kv_.get(), r.q, r.k, r.v, r.out});
  }
  return impl_->executor->decode(layer, items);
}

const EngineOptions& Engine::options() const { return impl_->options; }
bool Engine::on_gpu() const { return impl_->cuda != nullptr; }
scheduler::ExecutorStats Engine::stats() const { return impl_->executor->stats(); }
void Engine::reset_stats() { impl_->executor->reset_stats(); }
void Engine::set_late_policy(scheduler::LatePolicy late) {
  impl_->options.late = late;
  impl_->executor->set_late_policy(late);
}
scheduler::Executor& Engine::executor() { return *impl_->executor; }

std::string Engine::describe() const {
  std::ostringstream os;
  os << "backend " << impl_->backend->name() << "; gpu tier " << format_bytes(impl_->options.gpu_bytes) << " ("
     << impl_->arena->capacity() << " slots), host " << format_bytes(impl_->options.host_bytes)
     << " per session, nvme under " << impl_->options.nvme_dir.string() << "; cost rates: " << impl_->rates_source
     << "; " << impl_->executor->describe();
  return os.str();
}

// ---------------------------------------------------------------- Session

Session::Session(Engine* engine, std::unique_ptr<scheduler::SequenceKv> kv) : engine_(engine), kv_(std::move(kv)) {}
Session::~Session() = default;

uint64_t Session::tokens(uint32_t layer) const { return kv_->tokens(layer); }
uint64_t Session::tokens() const {
  uint64_t t = kv_->tokens(0);
  for (uint32_t l = 1; l < engine_->options().shape.layers; ++l) t = std::min(t, kv_->tokens(l));
  return t;
}
uint64_t Session::max_tokens() const { return kv_->max_tokens(); }

Status Session::prefill(uint32_t layer, uint64_t first_token, uint32_t n, std::span<const bf16> q,
                        std::span<const bf16> k, std::span<const bf16> v, std::span<float> out) {
  return engine_->impl_->executor->prefill(*kv_, layer, first_token, n, q, k, v, out);
}

Status Session::decode_step(uint32_t layer, std::span<const bf16> q, std::span<const bf16> k, std::span<const bf16> v,
                            std::span<float> out) {
  const DecodeRequest r{this, q, k, v, out};
  return engine_->decode_layer(layer, std::span<const DecodeRequest>(&r, 1));
}

Status Session::save() { return engine_->impl_->executor->save_sequence(*kv_, path_); }
const std::filesystem::path& Session::path() const { return path_; }
scheduler::Placement Session::placement() const { return kv_->placement(); }

Result<cpu::FidelityReport> Session::verify_last_step(uint32_t layer, std::span<const bf16> q,
                                                      std::span<const float> out) {
  return engine_->impl_->executor->verify(*kv_, layer, q, out);
}

const std::vector<std::vector<uint32_t>>& Session::last_selection(uint32_t layer) const {
  return kv_->last_selection(layer);
}

scheduler::SequenceKv& Session::kv() { return *kv_; }

}  // namespace kvtier::runtime
