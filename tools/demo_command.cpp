// `kvtier demo`: kvtier's main job (issue 6, item 8). The synthetic
// attention-only model prefills a context whose KV spreads over the GPU, host
// RAM and NVMe, then decodes it, all layers every step, with the GPU and the
// CPU attending at once; it prints tier placement, prefill and decode speed,
// overlap and fidelity against dense attention. A front end over
// runtime::run_synthetic(), with machine-dependent defaults: a 1M-token
// Llama-3.1-8B context on a GPU host, a small shape that finishes well within
// two minutes on a CPU-only machine.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "cli.h"
#include "kvtier/core/block.h"
#include "kvtier/core/policy.h"
#include "kvtier/core/shape.h"
#include "kvtier/core/sizes.h"
#include "kvtier/runtime/machine_info.h"
#include "kvtier/runtime/model_catalog.h"
#include "kvtier/runtime/synthetic_run.h"
#include "options.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace kvtier::cli {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20, kGiB = uint64_t{1} << 30;
constexpr const char* kGpuModel = "llama-3.1-8b";

// What the command line asked for; unset fields take the machine's defaults.
struct DemoOptions {
  runtime::SyntheticRunConfig run;
  std::optional<std::string> model;
  std::optional<uint32_t> layers;
  std::optional<uint64_t> context_tokens, gpu_bytes, host_bytes;
  std::optional<fs::path> dir, trace;
  std::string model_label;  // filled with the shape
  bool json = false;
  bool progress = false;
};

// The machine-dependent defaults of issue 6, item 8.
struct Defaults {
  std::string model_label;
  ModelShape shape;
  uint64_t context_tokens = 0, gpu_bytes = 0, host_bytes = 0;
};

// The CPU-only default: small enough that prefill and decode finish within two
// minutes on two cores (about 30 s measured), with budgets that put blocks in all three tiers
// (the CPU backend's stand-in for GPU memory is host memory).
Defaults cpu_defaults() {
  Defaults d;
  d.model_label = "small CPU shape";
  d.shape.layers = 4;
  d.shape.q_heads = 8;
  d.shape.kv_heads = 2;
  d.shape.head_dim = 64;
  d.context_tokens = 65536;
  d.gpu_bytes = 64 * kMiB;
  d.host_bytes = 128 * kMiB;
  return d;
}

// A GPU host: Llama-3.1-8B's attention at 1M tokens, a workstation card's
// 24 GiB (less on a smaller card) and at most 60% of RAM over the batch.
Defaults gpu_defaults(const runtime::MachineFacts& facts, uint32_t batch) {
  Defaults d;
  d.model_label = kGpuModel;
  d.shape = llama31_8b_shape();
  d.context_tokens = uint64_t{1} << 20;
  const auto gpu_share = static_cast<uint64_t>(0.8 * static_cast<double>(facts.gpus.front().memory_bytes));
  d.gpu_bytes = std::min<uint64_t>(24 * kGiB, gpu_share);
  const auto ram_share = static_cast<uint64_t>(0.6 * static_cast<double>(facts.memory_bytes));
  d.host_bytes = std::min<uint64_t>(64 * kGiB, ram_share) / batch;
  return d;
}

po::options_description demo_options() {
  const SparsityPolicy policy;
  po::options_description o("kvtier demo options");
  o.add_options()("help,h", "show this help")(
      "model", po::value<std::string>(),
      "model preset whose attention shape runs (e.g. llama-3.1-8b); default: llama-3.1-8b with a GPU, else a small "
      "shape (4 layers, 8 q heads, 2 KV heads, head dim 64)")(
      "layers", po::value<std::string>(), "override the shape's layer count (e.g. 2 for a quick look)")(
      "context", po::value<std::string>(),
      "prefilled tokens per sequence (1M = 1048576); default: 1M with a GPU, 64K without")(
      "gpu-bytes", po::value<std::string>(),
      "GPU tier budget in bytes (24GiB); default: min(24 GiB, 80% of the GPU's memory), or 64MiB of host memory "
      "standing in for it on the CPU backend")(
      "host-bytes", po::value<std::string>(),
      "host RAM per sequence for blocks and NVMe staging; default: min(64 GiB, 60% of RAM) split over the batch, "
      "or 128MiB on the CPU backend; the rest of the context goes to NVMe")(
      "dir", po::value<std::string>(),
      "directory for the NVMe tier's files (kept); default: a fresh temporary directory, removed at the end")(
      "steps", po::value<std::string>()->default_value("16"),
      "timed decode steps, all layers each, after 2 warm-up steps")(
      "batch", po::value<std::string>()->default_value("1"),
      "sequences decoding together, each its own context (1..64)")(
      "device", po::value<std::string>()->default_value("auto"), "auto (CUDA when a GPU is present), cpu or cuda")(
      "threads", po::value<std::string>()->default_value("0"),
      "CPU worker threads (0: every core of the GPU's NUMA node, or of the machine)")(
      "late", po::value<std::string>()->default_value("wait"),
      "NVMe blocks that cannot land in time: wait, or summary (their summary this step, exact once they arrive)")(
      "rho", po::value<std::string>()->default_value("0.9"),
      "correlation of consecutive decode queries, in [0, 1] (0: independent, the adversarial case)")(
      "verify-every", po::value<std::string>()->default_value("8"),
      "dense fp64 check of every Nth decode step (one layer, rotating); 0: none")(
      "needles", po::value<std::string>()->default_value("11"), "needle recall over this many depths 0-100%; 0: none")(
      "trace", po::value<std::string>(), "write a Chrome trace of the run to FILE (open it in ui.perfetto.dev)")(
      "json", po::bool_switch(), "print one JSON object on stdout (default: text)")(
      "progress", po::bool_switch(), "show prefill progress on stderr even when it is not a terminal")(
      "topk", po::value<std::string>()->default_value(std::to_string(policy.topk_chunks)),
      "selected far blocks per KV head per step")(
      "window", po::value<std::string>()->default_value(std::to_string(policy.window_tokens)),
      "most recent tokens, always attended")(
      "sinks", po::value<std::string>()->default_value(std::to_string(policy.sink_tokens)),
      "first tokens, always attended")(
      "chunk", po::value<std::string>()->default_value(std::to_string(policy.chunk_tokens)),
      "tokens per block (a power of two in 16..256)");
  return o;
}

std::string text_of(const po::variables_map& vm, const char* name) { return vm[name].as<std::string>(); }

// --name as a whole number in [lo, hi] (K/M suffixes allowed); "" or the problem.
std::string read_count(const po::variables_map& vm, const char* name, uint64_t lo, uint64_t hi, uint64_t& out) {
  const std::string text = text_of(vm, name);
  const Result<uint64_t> v = parse_tokens(text);
  if (!v.ok() || *v < lo || *v > hi)
    return std::string("--") + name + " '" + text + "' must be a whole number in " + std::to_string(lo) + ".." +
           std::to_string(hi);
  out = *v;
  return "";
}

// --name as a byte size > 0, when given.
std::string read_bytes(const po::variables_map& vm, const char* name, std::optional<uint64_t>& out) {
  if (vm.count(name) == 0) return "";
  const std::string text = text_of(vm, name);
  const Result<uint64_t> v = parse_bytes(text);
  if (!v.ok() || *v == 0) return std::string("--") + name + " '" + text + "' is not a size > 0 (e.g. 64MiB, 24GiB)";
  out = *v;
  return "";
}

std::string read_device(const po::variables_map& vm, runtime::DeviceChoice& out) {
  const std::string text = text_of(vm, "device");
  if (text == "auto")
    out = runtime::DeviceChoice::kAuto;
  else if (text == "cpu")
    out = runtime::DeviceChoice::kCpu;
  else if (text == "cuda")
    out = runtime::DeviceChoice::kCuda;
  else
    return "--device '" + text + "' is unknown (use auto, cpu or cuda)";
  return "";
}

// The policy options, checked together; a problem names the option of the field.
std::string read_policy(const po::variables_map& vm, SparsityPolicy& p) {
  uint64_t topk = 0, chunk = 0;
  if (auto e = read_count(vm, "sinks", 0, uint64_t{1} << 40, p.sink_tokens); !e.empty()) return e;
  if (auto e = read_count(vm, "window", 0, uint64_t{1} << 40, p.window_tokens); !e.empty()) return e;
  if (auto e = read_count(vm, "chunk", 1, 1u << 20, chunk); !e.empty()) return e;
  if (auto e = read_count(vm, "topk", 1, 1u << 24, topk); !e.empty()) return e;
  p.chunk_tokens = static_cast<uint32_t>(chunk);
  p.topk_chunks = static_cast<uint32_t>(topk);
  const Status st = validate(p);
  if (st.ok()) return "";
  constexpr std::pair<const char*, const char*> kFieldOption[] = {{"sink_tokens", "--sinks"},
                                                                  {"window_tokens", "--window"},
                                                                  {"chunk_tokens", "--chunk"},
                                                                  {"topk_chunks", "--topk"}};
  for (const auto& [field, option] : kFieldOption)
    if (st.message().find(field) != std::string::npos) return std::string(option) + ": " + st.message();
  return "--sinks/--window/--chunk/--topk: " + st.message();
}

// Counts and switches of the run itself.
std::string read_run(const po::variables_map& vm, runtime::SyntheticRunConfig& run) {
  uint64_t steps = 0, batch = 0, threads = 0, verify = 0, needles = 0;
  if (auto e = read_count(vm, "steps", 1, 1'000'000, steps); !e.empty()) return e;
  if (auto e = read_count(vm, "batch", 1, 64, batch); !e.empty()) return e;
  if (auto e = read_count(vm, "threads", 0, 4096, threads); !e.empty()) return e;
  if (auto e = read_count(vm, "verify-every", 0, 1'000'000, verify); !e.empty()) return e;
  if (auto e = read_count(vm, "needles", 0, 101, needles); !e.empty()) return e;
  run.decode_steps = static_cast<uint32_t>(steps);
  run.batch = static_cast<uint32_t>(batch);
  run.engine.cpu_threads = static_cast<unsigned>(threads);
  run.verify_every = static_cast<uint32_t>(verify);
  run.needle_depths = static_cast<uint32_t>(needles);
  const std::string rho = text_of(vm, "rho");
  char* end = nullptr;
  run.query_correlation = std::strtod(rho.c_str(), &end);
  if (rho.empty() || *end != '\0' || !(run.query_correlation >= 0 && run.query_correlation <= 1))
    return "--rho '" + rho + "' must be a number in [0, 1] (e.g. 0.9)";
  const Result<scheduler::LatePolicy> late = scheduler::parse_late_policy(text_of(vm, "late"));
  if (!late.ok()) return "--late: " + late.status().message();
  run.engine.late = *late;
  if (auto e = read_device(vm, run.engine.device); !e.empty()) return e;
  return read_policy(vm, run.engine.policy);
}

// Model, shape and sizes: kept optional until the machine's defaults are known.
std::string read_model(const po::variables_map& vm, DemoOptions& o) {
  if (vm.count("model") != 0) {
    const Result<runtime::ModelPreset> preset = runtime::find_model(text_of(vm, "model"));
    if (!preset.ok()) return "--model: " + preset.status().message();
    if (const Status st = runtime::validate(*preset); !st.ok()) return "--model: " + st.message();
    o.model = preset->name;
  }
  if (vm.count("layers") != 0) {
    uint64_t layers = 0;
    if (auto e = read_count(vm, "layers", 1, 4096, layers); !e.empty()) return e;
    o.layers = static_cast<uint32_t>(layers);
  }
  if (vm.count("context") != 0) {
    const std::string text = text_of(vm, "context");
    const Result<uint64_t> tokens = parse_tokens(text);
    if (!tokens.ok() || *tokens == 0) return "--context '" + text + "' is not a token count > 0 (e.g. 64K, 1M)";
    o.context_tokens = *tokens;
  }
  if (auto e = read_bytes(vm, "gpu-bytes", o.gpu_bytes); !e.empty()) return e;
  return read_bytes(vm, "host-bytes", o.host_bytes);
}

// Paths: --dir must be a directory, --trace must be writable where it points.
std::string read_paths(const po::variables_map& vm, DemoOptions& o) {
  std::error_code ec;
  if (vm.count("dir") != 0) {
    o.dir = text_of(vm, "dir");
    if (!fs::is_directory(*o.dir, ec))
      return "--dir '" + o.dir->string() +
             "' is not a directory; pass an existing directory on the drive for the NVMe tier";
  }
  if (vm.count("trace") != 0) {
    o.trace = text_of(vm, "trace");
    const fs::path parent = o.trace->parent_path().empty() ? fs::path(".") : o.trace->parent_path();
    if (!fs::is_directory(parent, ec) || ::access(parent.c_str(), W_OK) != 0)
      return "--trace '" + o.trace->string() + "': directory '" + parent.string() +
             "' is not writable; pick a FILE in a writable directory";
  }
  return "";
}

std::string read_options(const po::variables_map& vm, DemoOptions& o) {
  if (auto e = read_run(vm, o.run); !e.empty()) return e;
  if (auto e = read_model(vm, o); !e.empty()) return e;
  o.json = vm["json"].as<bool>();
  o.progress = vm["progress"].as<bool>() || ::isatty(STDERR_FILENO) != 0;
  return read_paths(vm, o);
}

// Fills what the command line left unset from the machine's defaults; a
// problem (no GPU for --device cuda, an invalid shape) is one line.
std::string apply_defaults(DemoOptions& o) {
  runtime::EngineOptions& engine = o.run.engine;
  bool use_gpu = false;
  std::optional<runtime::MachineFacts> facts;
  if (engine.device != runtime::DeviceChoice::kCpu) {
    facts = runtime::describe_machine(o.dir ? o.dir->string() : fs::temp_directory_path().string());
    use_gpu = !facts->gpus.empty();
    if (!use_gpu && engine.device == runtime::DeviceChoice::kCuda)
      return "--device cuda: no CUDA GPU found (" + (facts->gpu_error.empty() ? "none listed" : facts->gpu_error) +
             "); use --device cpu or auto";
  }
  const Defaults d = use_gpu ? gpu_defaults(*facts, o.run.batch) : cpu_defaults();
  o.model_label = d.model_label;
  engine.shape = d.shape;
  if (o.model) {
    engine.shape = runtime::find_model(*o.model)->shape;
    o.model_label = *o.model;
  }
  if (o.layers) engine.shape.layers = *o.layers;
  if (const Status st = validate(engine.shape); !st.ok()) return (o.layers ? "--layers: " : "--model: ") + st.message();
  o.run.context_tokens = o.context_tokens.value_or(d.context_tokens);
  engine.gpu_bytes = o.gpu_bytes.value_or(d.gpu_bytes);
  engine.host_bytes = o.host_bytes.value_or(d.host_bytes);
  return "";
}

// The NVMe tier's directory: --dir as given, or a fresh temporary one that is
// removed, with everything in it, when the command ends on any path.
class NvmeDir {
 public:
  static Result<NvmeDir> make(const std::optional<fs::path>& given) {
    if (given) return NvmeDir(*given, false);
    const fs::path path = fs::temp_directory_path() / ("kvtier-demo-" + std::to_string(::getpid()));
    std::error_code ec;
    fs::remove_all(path, ec);  // a leftover of an earlier process with this pid
    if (!fs::create_directory(path, ec))
      return io_error("cannot create the NVMe tier's directory '" + path.string() + "': " + ec.message() +
                      " (pass --dir on a writable drive)");
    return NvmeDir(path, true);
  }
  NvmeDir(NvmeDir&& other) noexcept : path_(std::move(other.path_)), owned_(std::exchange(other.owned_, false)) {}
  NvmeDir(const NvmeDir&) = delete;
  NvmeDir& operator=(const NvmeDir&) = delete;
  NvmeDir& operator=(NvmeDir&&) = delete;
  ~NvmeDir() {
    std::error_code ec;
    if (owned_) fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  bool temporary() const { return owned_; }

 private:
  NvmeDir(fs::path path, bool owned) : path_(std::move(path)), owned_(owned) {}
  fs::path path_;
  bool owned_;
};

std::string fixed(double v, int digits) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(digits) << v;
  return os.str();
}

std::string general(double v) {
  std::ostringstream os;
  os << std::setprecision(3) << v;
  return os.str();
}

// GiB with two decimals, three below 1 GiB so that a small run's tiers do not read as zero.
std::string gib(uint64_t bytes) {
  return fixed(static_cast<double>(bytes) / static_cast<double>(kGiB), bytes < kGiB ? 3 : 2) + " GiB";
}

// One line on stderr redrawn with '\r' at most ten times a second: the share
// of the context prefilled (run_synthetic counts tokens over all sequences of
// the batch) and the rate so far.
class ProgressBar {
 public:
  explicit ProgressBar(std::ostream& err) : err_(err) {}

  void update(uint64_t done, uint64_t total) {
    const auto now = std::chrono::steady_clock::now();
    if (done < total && drawn_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    drawn_ = true;
    const double share = total > 0 ? static_cast<double>(done) / static_cast<double>(total) : 0.0;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    constexpr int kWidth = 30;
    const int filled = std::clamp(static_cast<int>(kWidth * share), 0, kWidth);
    err_ << "\rprefill [" << std::string(filled, '#') << std::string(kWidth - filled, '.') << "] " << std::setw(5)
         << fixed(100.0 * share, 1) << "%  " << format_tokens(done) << " of " << format_tokens(total) << " tokens  "
         << fixed(seconds > 0 ? static_cast<double>(done) / seconds : 0.0, 0) << " tokens/s   " << std::flush;
  }

  // Ends the line if one was drawn.
  void finish() {
    if (drawn_) err_ << "\n" << std::flush;
    drawn_ = false;
  }

 private:
  std::ostream& err_;
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_draw_{};
  bool drawn_ = false;
};

std::string fidelity_text(const runtime::SyntheticRunReport& r, const DemoOptions& o) {
  if (r.verified == 0)
    return o.run.verify_every == 0 ? "not checked (--verify-every 0)"
                                   : "no step checked (more --steps or a smaller --verify-every)";
  return "relative error p50 " + general(r.rel_error_p50) + ", max " + general(r.rel_error_max) +
         "; softmax mass recalled p10 " + fixed(r.mass_recall_p10, 3) + ", mean " + fixed(r.mass_recall_mean, 3) +
         " (" + std::to_string(r.verified) + " layer steps checked against dense fp64 attention)";
}

std::string summary_text(const DemoOptions& o, const runtime::SyntheticRunReport& r, const NvmeDir& dir) {
  const runtime::SyntheticRunConfig& c = o.run;
  const ModelShape& s = c.engine.shape;
  const uint64_t kv_bytes = s.kv_bytes_per_token() * c.context_tokens * c.batch;
  std::ostringstream os;
  os << "kvtier demo: synthetic attention model, prefill then decode with KV over GPU, host RAM and NVMe\n";
  os << "  backend:      " << r.backend << "\n";
  os << "  shape:        " << o.model_label << ": " << to_string(s) << "\n";
  os << "  policy:       " << to_string(c.engine.policy)
     << ", late blocks: " << scheduler::late_policy_name(c.engine.late) << "\n";
  os << "  context:      " << format_tokens(c.context_tokens) << " tokens x " << c.batch << " sequence"
     << (c.batch > 1 ? "s" : "") << " (" << gib(kv_bytes) << " of KV); budgets gpu " << format_bytes(c.engine.gpu_bytes)
     << ", host " << format_bytes(c.engine.host_bytes) << (c.batch > 1 ? " per sequence" : "") << "\n";
  os << "  placement:    gpu " << gib(r.placement.gpu_cached_bytes) << " (cached copies), host "
     << gib(r.placement.host_home_bytes) << ", nvme " << gib(r.placement.nvme_home_bytes) << ", summaries "
     << gib(r.placement.summary_bytes) << " (sequence 0)\n";
  os << "  nvme dir:     " << dir.path().string() << (dir.temporary() ? " (temporary, removed)" : " (kept)") << "\n";
  os << "  prefill:      " << fixed(r.prefill_tokens_per_s, 0) << " tokens/s (all layers): "
     << fixed(r.prefill_seconds, 1) << " s in prefill, " << fixed(r.prefill_wall_seconds, 1)
     << " s with generating the synthetic q, k, v\n";
  os << "  decode:       " << fixed(r.decode_steps_per_s, 2) << " steps/s, " << fixed(r.decode_tokens_per_s, 2)
     << " tokens/s (median of " << c.decode_steps << " steps of all " << s.layers << " layers, query correlation "
     << general(c.query_correlation) << ")\n";
  os << "  overlap:      " << fixed(r.overlap_fraction, 3) << " of decode wall time with two or more devices busy\n";
  os << "  selection:    " << fixed(r.selection_overlap, 3)
     << " of each step's selected blocks kept from the previous step\n";
  os << "  late blocks:  " << fixed(r.late_blocks_per_step, 2) << " per decode step (all layers, summed over the batch)\n";
  os << "  fidelity:     " << fidelity_text(r, o) << "\n";
  os << "  needles:      "
     << (r.needle_recall < 0
             ? std::string("not measured (--needles 0)")
             : "recall " + fixed(r.needle_recall, 3) + " over " + std::to_string(c.needle_depths) + " depths 0-100%")
     << "\n";
  if (r.rel_error_full_budget >= 0)
    os << "  full budget:  relative error " << general(r.rel_error_full_budget) << " with top-k covering every block ("
       << format_tokens(r.full_budget_context) << " tokens)\n";
  os << "  trace:        "
     << (o.trace ? o.trace->string() + " (Chrome trace: open in ui.perfetto.dev)" : std::string("none (--trace FILE)"))
     << "\n";
  return os.str();
}

// The configuration next to run_synthetic's report in --json output.
nlohmann::json config_json(const DemoOptions& o, const NvmeDir& dir) {
  const runtime::SyntheticRunConfig& c = o.run;
  return {{"model", o.model_label},
          {"shape", to_string(c.engine.shape)},
          {"policy", to_string(c.engine.policy)},
          {"context_tokens", c.context_tokens},
          {"batch", c.batch},
          {"gpu_bytes", c.engine.gpu_bytes},
          {"host_bytes", c.engine.host_bytes},
          {"nvme_dir", dir.path().string()},
          {"late", scheduler::late_policy_name(c.engine.late)},
          {"query_correlation", c.query_correlation},
          {"decode_steps", c.decode_steps},
          {"verify_every", c.verify_every},
          {"needle_depths", c.needle_depths},
          {"trace", o.trace ? nlohmann::json(o.trace->string()) : nlohmann::json(nullptr)}};
}

// Failures of the run: input the engine refuses (budgets too small, a context
// the tiers cannot hold) is a usage error, anything else a failed run.
int report_error(const Status& st, std::ostream& err) {
  std::string message = st.message();
  std::replace(message.begin(), message.end(), '\n', ' ');
  err << "kvtier demo: " << message << "\n";
  const bool input = st.code() == StatusCode::kInvalidArgument || st.code() == StatusCode::kOutOfRange ||
                     st.code() == StatusCode::kUnsupported;
  return input ? kExitUsage : kExitFailure;
}

int run_demo(DemoOptions& o, std::ostream& out, std::ostream& err) {
  Result<NvmeDir> dir = NvmeDir::make(o.dir);
  if (!dir.ok()) return report_error(dir.status(), err);
  o.run.engine.nvme_dir = dir->path();
  // The default context is the largest the tiers hold, up to the default: host
  // homes (host budget less its staging quarter) plus 90% of the directory's
  // free space (the NVMe file is sparse: only its NVMe share is written).
  if (!o.context_tokens) {
    const BlockGeometry g(o.run.engine.shape, o.run.engine.policy.chunk_tokens);
    const uint64_t per_token = g.slot_bytes() * o.run.engine.shape.layers * o.run.engine.shape.kv_heads /
                               o.run.engine.policy.chunk_tokens;
    std::error_code ec;
    const fs::space_info space = fs::space(dir->path(), ec);
    if (!ec) {
      const uint64_t homes = o.run.engine.host_bytes - std::max(o.run.engine.host_bytes / 4, 64 * g.slot_bytes());
      const uint64_t room = homes + space.available / 10 * 9;
      const uint64_t fit = room / per_token / o.run.batch / 65536 * 65536;
      if (fit < o.run.context_tokens) {
        if (fit == 0) return report_error(no_space("the NVMe directory " + dir->path().string() + " has " +
                                                   format_bytes(space.available) + " free: too little for a demo; "
                                                   "pass --dir on a larger drive or a smaller --context"), err);
        err << "kvtier demo: context lowered from " << format_tokens(o.run.context_tokens) << " to "
            << format_tokens(fit) << " tokens: host homes plus 90% of the free space under " << dir->path().string()
            << " hold that much (--context sets it)\n";
        o.run.context_tokens = fit;
      }
    }
  }
  // run_synthetic measures overlap on a trace of its own unless given one.
  runtime::TraceRecorder trace;
  if (o.trace) o.run.engine.trace = &trace;
  ProgressBar bar(err);
  if (o.progress) o.run.progress = [&bar](uint64_t done, uint64_t total) { bar.update(done, total); };
  const Result<runtime::SyntheticRunReport> report = runtime::run_synthetic(o.run);
  bar.finish();
  if (!report.ok()) return report_error(report.status(), err);
  // A trace that cannot be written must not cost the run's results: they are
  // printed first, the error after them.
  const Status traced = o.trace ? trace.write(*o.trace) : Status::ok_status();
  if (!traced.ok()) o.trace.reset();
  if (o.json) {
    nlohmann::json j = report->to_json();
    j["demo"] = config_json(o, *dir);
    out << j.dump(2) << "\n";
  } else {
    out << summary_text(o, *report, *dir);
  }
  return traced.ok() ? kExitOk : report_error(traced, err);
}

}  // namespace

int demo_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  const po::options_description options = demo_options();
  po::variables_map vm;
  if (auto stop = parse_options("demo", args, options, nullptr, vm, out, err)) return *stop;
  DemoOptions o;
  std::string problem = read_options(vm, o);
  if (problem.empty()) problem = apply_defaults(o);
  if (!problem.empty()) {
    err << "kvtier demo: " << problem << "\n";
    return kExitUsage;
  }
  return run_demo(o, out, err);
}

}  // namespace kvtier::cli
