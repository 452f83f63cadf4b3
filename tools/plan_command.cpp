// `kvtier plan`: will a model at a context length fit this machine's GPU,
// host RAM and NVMe, and how fast will it decode and prefill? A modeled
// prediction (docs/plan.md); --sweep tabulates and plots it against context.
#include <fstream>
#include <optional>
#include <ostream>

#include "cli.h"
#include "kvtier/core/sizes.h"
#include "kvtier/runtime/plan.h"
#include "options.h"

namespace po = boost::program_options;

namespace kvtier::cli {
namespace {

struct Options {
  runtime::PlanRequest request;
  std::vector<std::string> machines;
  std::optional<runtime::SweepSpec> sweep;
  std::string svg_path;
  bool json = false;
};

po::options_description plan_options() {
  po::options_description o("kvtier plan options");
  o.add_options()("help,h", "show this help")(
      "model", po::value<std::string>(), "model preset (e.g. llama-3.1-8b) or a Hugging Face config.json path")(
      "context", po::value<std::string>(), "context length per sequence in tokens (1M = 1048576; 128K, 4M)")(
      "machine", po::value<std::vector<std::string>>(),
      "machine: comma list of presets and profile files, e.g. rtx4090,ddr5-128g,nvme-gen4 (repeat with --sweep "
      "for one line per machine)")("batch", po::value<std::string>()->default_value("1"),
                                   "sequences decoded together, each with its own context (default 1)")(
      "policy", po::value<std::string>()->default_value(""),
      "sparsity policy overrides key=value,... : sink_tokens (128), window_tokens (4096), chunk_tokens (64), "
      "topk_chunks (64 blocks per KV head), summary (mean_bf16), far_field (none)")(
      "late", po::value<std::string>()->default_value("wait"),
      "NVMe blocks that cannot land in time: wait, or summary (use their summary this step)")(
      "gpu-budget", po::value<std::string>(),
      "GPU memory for KV in bytes (24GiB); default: GPU memory - weights - 2 GiB - 10%")(
      "host-budget", po::value<std::string>(),
      "host RAM for KV blocks in bytes; default: 80% of host RAM - summaries")(
      "host-cache", po::value<std::string>(),
      "host RAM beyond --host-budget for the NVMe staging cache, per sequence (the runtime's host_cache_bytes); "
      "default: none modeled, so only the last step's NVMe reads are still in host memory")(
      "selection-overlap", po::value<std::string>(),
      "share of each step's top-k also selected the step before, in [0, 1] (default 0.6, modeled)")(
      "selection-shares", po::value<std::string>(),
      "gpu=G,nvme=N: measured shares of each step's selected blocks that are GPU-resident and read from NVMe "
      "(the rest in host memory; e.g. from a trace or kvtier bench e2e's blocks_per_layer_step), instead of "
      "the modeled ones")(
      "score-on", po::value<std::string>()->default_value("gpu"),
      "where decode scores the summaries: gpu (mean keys mirrored in the GPU budget, when they fit a quarter "
      "of it) or cpu")(
      "json", po::bool_switch(), "print one JSON object on stdout (default: text)")(
      "sweep", po::value<std::string>(),
      "context=FROM:TO[:STEPS]: a table over contexts (powers of two, or STEPS log-spaced points) and an SVG plot")(
      "svg", po::value<std::string>()->default_value("plan-sweep.svg"), "where --sweep writes its plot");
  return o;
}

// One-line usage errors in the option values; "" when they are fine.
std::string read_options(const po::variables_map& vm, Options& o) {
  if (vm.count("model") == 0) return "--model is required (e.g. --model llama-3.1-8b)";
  if (vm.count("machine") == 0) return "--machine is required (e.g. --machine rtx4090,ddr5-128g,nvme-gen4)";
  if (vm.count("context") == 0 && vm.count("sweep") == 0) return "--context is required (e.g. --context 1M)";
  runtime::PlanRequest& q = o.request;
  q.model = vm["model"].as<std::string>();
  o.machines = vm["machine"].as<std::vector<std::string>>();
  if (o.machines.size() > 1 && vm.count("sweep") == 0) return "--machine is given more than once; that needs --sweep";
  if (vm.count("context") != 0) {
    Result<uint64_t> tokens = parse_tokens(vm["context"].as<std::string>());
    if (!tokens.ok() || *tokens == 0) return "--context '" + vm["context"].as<std::string>() + "' is not a token count > 0";
    q.context_tokens = *tokens;
  }
  Result<uint64_t> batch = parse_tokens(vm["batch"].as<std::string>());
  if (!batch.ok() || *batch == 0 || *batch > 4096) return "--batch '" + vm["batch"].as<std::string>() + "' must be in 1..4096";
  q.batch = static_cast<uint32_t>(*batch);
  Result<SparsityPolicy> policy = runtime::parse_policy_overrides(vm["policy"].as<std::string>());
  if (!policy.ok()) return "--policy: " + policy.status().message();
  q.policy = *policy;
  Result<runtime::LatePolicy> late = scheduler::parse_late_policy(vm["late"].as<std::string>());
  if (!late.ok()) return "--late: " + late.status().message();
  q.late = *late;
  for (const char* name : {"gpu-budget", "host-budget", "host-cache"}) {
    if (vm.count(name) == 0) continue;
    Result<uint64_t> bytes = parse_bytes(vm[name].as<std::string>());
    if (!bytes.ok() || *bytes == 0) return std::string("--") + name + " '" + vm[name].as<std::string>() + "' is not a size > 0 (e.g. 8GiB)";
    const std::string_view n = name;
    (n == "gpu-budget" ? q.gpu_budget_bytes : n == "host-budget" ? q.host_budget_bytes : q.host_cache_bytes) = *bytes;
  }
  if (vm.count("selection-overlap") != 0) {
    const std::string text = vm["selection-overlap"].as<std::string>();
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !(v >= 0 && v <= 1)) return "--selection-overlap '" + text + "' must be a number in [0, 1]";
    q.selection_overlap = v;
  }
  if (vm.count("selection-shares") != 0) {
    Result<runtime::MeasuredSelection> m = runtime::parse_selection_shares(vm["selection-shares"].as<std::string>());
    if (!m.ok()) return "--selection-shares " + m.status().message();
    if (vm.count("sweep") != 0)
      return "--selection-shares with --sweep: shares measured in one run do not hold at other contexts or machines; "
             "drop one of them";
    q.selection_shares = *m;
  }
  const std::string score_on = vm["score-on"].as<std::string>();
  if (score_on != "gpu" && score_on != "cpu") return "--score-on '" + score_on + "': give gpu or cpu";
  q.score_on_gpu = score_on == "gpu";
  if (vm.count("sweep") != 0) {
    Result<runtime::SweepSpec> sweep = runtime::parse_sweep(vm["sweep"].as<std::string>());
    if (!sweep.ok()) return sweep.status().message();
    o.sweep = *sweep;
  }
  o.svg_path = vm["svg"].as<std::string>();
  o.json = vm["json"].as<bool>();
  return "";
}

// Input errors the simulator finds (unknown preset, impossible value) are
// usage errors: one line, exit 2.
int report_error(const Status& st, std::ostream& err) {
  std::string message = st.message();
  for (char& c : message) c = c == '\n' ? ' ' : c;
  err << "kvtier plan: " << message << "\n";
  const bool input = st.code() == StatusCode::kInvalidArgument || st.code() == StatusCode::kNotFound ||
                     st.code() == StatusCode::kOutOfRange || st.code() == StatusCode::kUnsupported;
  return input ? kExitUsage : kExitFailure;
}

int run_sweep(const Options& o, std::ostream& out, std::ostream& err) {
  std::vector<runtime::SweepSeries> series;
  const std::vector<uint64_t> contexts = runtime::sweep_contexts(*o.sweep, o.request.policy.chunk_tokens);
  for (const std::string& machine : o.machines) {
    runtime::SweepSeries& s = series.emplace_back();
    s.label = machine;
    for (uint64_t tokens : contexts) {
      runtime::PlanRequest q = o.request;
      q.machine = machine;
      q.context_tokens = tokens;
      Result<runtime::PlanReport> r = runtime::plan(q);
      if (!r.ok()) return report_error(r.status(), err);
      s.points.push_back(std::move(r).value());
    }
  }
  std::ofstream svg(o.svg_path);
  if (svg << runtime::sweep_svg(series); !svg.flush()) {
    err << "kvtier plan: cannot write --svg '" << o.svg_path << "'\n";
    return kExitUsage;
  }
  if (o.json)
    out << runtime::sweep_json(series).dump(2) << "\n";
  else
    out << runtime::sweep_table(series) << "plot: " << o.svg_path
        << " (decode tokens/s against context; solid full model, dashed attention + tiering; x: does not fit)\n";
  return kExitOk;
}

}  // namespace

int plan_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  const po::options_description options = plan_options();
  po::variables_map vm;
  if (auto stop = parse_options("plan", args, options, nullptr, vm, out, err)) return *stop;
  Options o;
  if (const std::string problem = read_options(vm, o); !problem.empty()) {
    err << "kvtier plan: " << problem << "\n";
    return kExitUsage;
  }
  if (o.sweep) return run_sweep(o, out, err);
  o.request.machine = o.machines.front();
  Result<runtime::PlanReport> r = runtime::plan(o.request);
  if (!r.ok()) return report_error(r.status(), err);
  if (o.json)
    out << scheduler::to_json(*r).dump(2) << "\n";
  else
    out << runtime::plan_text(*r);
  return kExitOk;
}

}  // namespace kvtier::cli
