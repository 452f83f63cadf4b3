// `kvtier calibrate`: measures this machine with the kvtier-bench suites
// memory, storage, cpu and (with a GPU) gpu, each run as a child process
// printing its JSON report, and writes the machine profile they give
// (docs/machine-profile.md, "Calibrating"). Without a GPU, --gpu PRESET
// supplies the gpu and link parts, or --gpu cpu-standin measures kvtier's
// CPU stand-in for one.
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <ostream>
#include <sstream>

#include "child_process.h"
#include "cli.h"
#include "kvtier/core/sizes.h"
#include "kvtier/runtime/calibrate.h"
#include "options.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace kvtier::cli {
namespace {

struct Options {
  std::string dir, out, gpu_preset;
  bool json = false, quick = false;
};

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// Today in UTC, "2026-11-28".
std::string today() {
  const std::chrono::year_month_day d{std::chrono::floor<std::chrono::days>(std::chrono::system_clock::now())};
  char text[16];
  std::snprintf(text, sizeof text, "%04d-%02u-%02u", static_cast<int>(d.year()), static_cast<unsigned>(d.month()),
                static_cast<unsigned>(d.day()));
  return text;
}

// Why `path` cannot be written, or "" if it can (checked before minutes of benchmarks).
std::string out_problem(const fs::path& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return "is a directory";
  const fs::path parent = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  if (!fs::is_directory(parent, ec)) return "its directory '" + parent.string() + "' does not exist";
  if (fs::exists(path, ec) ? ::access(path.c_str(), W_OK) != 0 : ::access(parent.c_str(), W_OK) != 0)
    return std::strerror(errno);
  return "";
}

// Usage errors (exit 2) in the options' values, one line naming the option.
std::string usage_problem(const Options& o, const runtime::MachineFacts& facts) {
  std::error_code ec;
  if (!fs::is_directory(o.dir, ec))
    return "--dir '" + o.dir + "' is not a directory; pass an existing directory on the drive that would hold the "
                               "NVMe tier";
  if (const std::string why = out_problem(o.out); !why.empty()) return "cannot write --out '" + o.out + "': " + why;
  // The executor suite's layer count for experiments: a profile must come from the suite as documented.
  if (const char* layers = std::getenv("KVTIER_EXECUTOR_LAYERS"); layers != nullptr && *layers != '\0')
    return std::string("KVTIER_EXECUTOR_LAYERS=") + layers +
           " is set: it changes the executor suite that calibration reads; unset it to calibrate";
  const std::vector<std::string> presets = runtime::gpu_preset_names();
  if (!o.gpu_preset.empty() && o.gpu_preset != runtime::kCpuStandinName &&
      std::find(presets.begin(), presets.end(), o.gpu_preset) == presets.end())
    return "unknown --gpu preset '" + o.gpu_preset + "' (GPU presets: " + joined(presets) + "; or " +
           std::string(runtime::kCpuStandinName) + " for kvtier's CPU stand-in)";
  if (o.gpu_preset == runtime::kCpuStandinName && !facts.gpus.empty())
    return "--gpu " + o.gpu_preset + ": this machine has a GPU (" + facts.gpus.front().name +
           "), and kvtier runs on it, not on the CPU stand-in; drop --gpu to measure it, or hide it "
           "(CUDA_VISIBLE_DEVICES=) to calibrate the stand-in";
  if (o.gpu_preset.empty() && facts.gpus.empty())
    return "this machine has no GPU (" + (facts.gpu_error.empty() ? "none found" : facts.gpu_error) +
           "), so the gpu and link parts cannot be measured; pass --gpu PRESET to take them from a preset (" +
           joined(presets) + "), or --gpu " + std::string(runtime::kCpuStandinName) +
           " to measure kvtier's CPU stand-in for a GPU (what kvtier runs on here)";
  return "";
}

// Runs one suite and parses its report; on failure says which suite and why.
Result<nlohmann::json> run_suite(const std::string& bench, const std::string& suite, const Options& o,
                                 std::ostream& err) {
  std::vector<std::string> argv{bench, suite, "--json"};
  if (o.quick) argv.push_back("--quick");
  if (suite == "storage" || suite == "executor") argv.insert(argv.end(), {"--dir", o.dir});
  err << "kvtier calibrate: running kvtier-bench " << suite << (o.quick ? " --quick" : "") << "\n" << std::flush;
  const auto started = std::chrono::steady_clock::now();
  KVT_ASSIGN_OR_RETURN(const ChildResult child, run_child(argv, err, "  "));
  const std::string name = "kvtier-bench " + suite;
  const std::string tail = child.err_tail.substr(0, child.err_tail.find_last_not_of('\n') + 1);
  if (!child.signal.empty())
    return internal_error(name + " was ended by signal " + child.signal + "; its last output:\n" + tail);
  if (child.exit_code != 0)
    return internal_error(name + " failed with exit code " + std::to_string(child.exit_code) +
                          "; its last output:\n" + tail);
  nlohmann::json report = nlohmann::json::parse(child.out, nullptr, /*allow_exceptions=*/false);
  if (report.is_discarded()) return internal_error(name + " --json printed no JSON report");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  err << "kvtier calibrate: " << suite << " done in " << std::fixed << std::setprecision(1) << seconds << " s\n"
      << std::defaultfloat << std::flush;
  return report;
}

Result<runtime::BenchReports> run_suites(const Options& o, bool measure_gpu, std::ostream& err) {
  KVT_ASSIGN_OR_RETURN(const std::string bench, program_beside_self("kvtier-bench"));
  if (::access(bench.c_str(), X_OK) != 0)
    return not_found("cannot run " + bench + ": " + std::strerror(errno) +
                     " (build the kvtier-bench target: cmake --build build)");
  runtime::BenchReports r;
  KVT_ASSIGN_OR_RETURN(r.memory, run_suite(bench, "memory", o, err));
  KVT_ASSIGN_OR_RETURN(r.storage, run_suite(bench, "storage", o, err));
  KVT_ASSIGN_OR_RETURN(r.cpu, run_suite(bench, "cpu", o, err));
  KVT_ASSIGN_OR_RETURN(r.executor, run_suite(bench, "executor", o, err));
  if (measure_gpu) {
    KVT_ASSIGN_OR_RETURN(r.gpu, run_suite(bench, "gpu", o, err));
  }
  return r;
}

// Writes beside the target and renames, so a failure never leaves half a file.
Status write_profile(const std::string& path, const nlohmann::json& profile) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream f(tmp);
    f << profile.dump(2) << "\n";
    f.close();
    if (!f) {
      std::remove(tmp.c_str());
      return io_error("cannot write '" + path + "': writing " + tmp + " failed: " + std::strerror(errno));
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    return io_error("cannot write '" + path + "': " + ec.message());
  }
  return Status::ok_status();
}

// Three significant digits, never in exponent form: 0.386, 43.0, 1008.
std::string gbps(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.*f", v >= 100 ? 0 : v >= 10 ? 1 : v >= 1 ? 2 : 3, v);
  return text;
}

std::string curve_text(const scheduler::BandwidthCurve& c) {
  std::string s;
  for (const auto& p : c.points) s += (s.empty() ? "" : ", ") + format_bytes(p.bytes) + " " + gbps(p.gbps);
  return s + " GB/s";
}

std::string grid_text(const char* what, const scheduler::NvmeCurve& c) {
  std::string s;
  for (size_t i = 0; i < c.points.size(); ++i) {
    const auto& p = c.points[i];
    if (i == 0 || p.request_bytes != c.points[i - 1].request_bytes)
      s += std::string(s.empty() ? "" : " GB/s\n") + "        " + what + " " + format_bytes(p.request_bytes) + ":";
    s += " QD" + std::to_string(p.queue_depth) + " " + gbps(p.gbps);
  }
  return s + " GB/s";
}

// A few lines for people; the file holds the sources.
std::string profile_text(const runtime::MachineProfile& m, bool gpu_from_preset) {
  const char* how = gpu_from_preset ? " (preset, not measured)" : "";
  std::ostringstream os;
  os << "machine profile: " << m.name << "\n"
     << "  host  " << m.host.name << ": " << m.host.cores << " cores, read " << gbps(m.host.read_gbps)
     << " GB/s, score " << gbps(m.host.score_gbps) << " GB/s, attend " << gbps(m.host.attend_gbps) << " GB/s\n"
     << "        executor host time: prepare " << gbps(m.host.prepare_us_per_list) << " us per list, plan "
     << gbps(m.host.plan_us_per_block) << " us per block, " << gbps(m.host.step_overhead_us)
     << " us more per layer step, " << gbps(m.host.attend_call_us) << " us per CPU attention call\n"
     << "  gpu   " << m.gpu.name << how << ": " << format_bytes(m.gpu.memory_bytes) << ", " << m.gpu.sm_count
     << (m.gpu.cpu_standin ? " cores, " : " SMs, ") << gbps(m.gpu.hbm_read_gbps) << " GB/s, " << gbps(m.gpu.bf16_tflops) << " bf16 TFLOP/s\n"
     << "  link  " << m.link.name << how << ", duplex " << gbps(m.link.duplex_factor) << "\n"
     << "        h2d " << curve_text(m.link.h2d) << "\n"
     << "        d2h " << curve_text(m.link.d2h) << "\n"
     << "  nvme  " << m.nvme.name << ": " << format_bytes(m.nvme.capacity_bytes) << " free, latency "
     << gbps(m.nvme.latency_us) << " us\n"
     << grid_text("read ", m.nvme.read) << "\n"
     << grid_text("write", m.nvme.write) << "\n";
  return os.str();
}

uint64_t free_bytes(const std::string& dir) {
  struct statvfs vfs{};
  return ::statvfs(dir.c_str(), &vfs) == 0 ? uint64_t{vfs.f_bavail} * vfs.f_frsize : 0;
}

int calibrate(const Options& o, std::ostream& out, std::ostream& err) {
  const runtime::MachineFacts facts = runtime::describe_machine(o.dir);
  if (const std::string why = usage_problem(o, facts); !why.empty()) {
    err << "kvtier calibrate: " << why << "\n";
    return kExitUsage;
  }
  runtime::CalibrationInputs inputs{"kvtier calibrate " + today() + (o.quick ? " --quick" : ""), free_bytes(o.dir),
                                    o.gpu_preset};
  const Result<runtime::BenchReports> reports = run_suites(o, o.gpu_preset.empty(), err);
  if (!reports.ok()) {
    err << "kvtier calibrate: " << reports.status().message() << "\n";
    return kExitFailure;
  }
  const Result<runtime::MachineProfile> profile = runtime::calibrated_profile(facts, *reports, inputs);
  if (!profile.ok()) {
    err << "kvtier calibrate: " << profile.status().message() << "\n";
    return kExitFailure;
  }
  const nlohmann::json j = runtime::profile_json(*profile);
  if (const Status s = write_profile(o.out, j); !s.ok()) {
    err << "kvtier calibrate: " << s.message() << "\n";
    return kExitFailure;
  }
  err << "kvtier calibrate: wrote " << o.out << "\n";
  if (o.json)
    out << j.dump(2) << "\n";
  else
    out << profile_text(*profile, !o.gpu_preset.empty() && o.gpu_preset != runtime::kCpuStandinName);
  return kExitOk;
}

}  // namespace

int calibrate_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description options("kvtier calibrate options");
  options.add_options()("help,h", "show this help")(
      "dir", po::value<std::string>()->default_value("."),
      "directory on the drive that will hold the NVMe tier: the storage suite measures it (--quick needs 1 GiB "
      "free, else 8 GiB) and its free space becomes nvme.capacity_bytes")(
      "out", po::value<std::string>()->default_value("machine-profile.json"), "file the profile is written to")(
      "gpu", po::value<std::string>()->default_value(""),
      ("take the gpu and link parts from this GPU preset instead of measuring them (needed on a machine without "
       "a GPU): " + joined(runtime::gpu_preset_names()) + "; or " + std::string(runtime::kCpuStandinName) +
       " to measure kvtier's CPU stand-in for a GPU instead (what kvtier runs on without one; kvtier plan then "
       "models the GPU's work on the host's cores); default: measure GPU 0").c_str())(
      "json", po::bool_switch(), "print the profile as JSON on stdout (default: a summary)")(
      "quick", po::bool_switch(), "smaller sizes and fewer repeats in every suite: about 30 s on 2 cores (with --gpu)");
  po::variables_map vm;
  if (auto stop = parse_options("calibrate", args, options, nullptr, vm, out, err)) return *stop;
  // The storage suite and nvme.name get the directory's full path.
  std::error_code ec;
  const fs::path dir = fs::canonical(vm["dir"].as<std::string>(), ec);
  const Options o{ec ? vm["dir"].as<std::string>() : dir.string(), vm["out"].as<std::string>(), vm["gpu"].as<std::string>(),
                  vm["json"].as<bool>(), vm["quick"].as<bool>()};
  return calibrate(o, out, err);
}

}  // namespace kvtier::cli
