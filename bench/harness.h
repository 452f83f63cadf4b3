// What every kvtier benchmark shares: timing (median after warm-up) and the
// JSON report {"bench", "machine", "config", "results": [{name, value, unit,
// baseline, ratio}]}, where baseline names another result of the same run and
// ratio = value / that result's value.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

namespace kvtier::bench {

struct Timing {
  double median_s = 0, min_s = 0, max_s = 0;
  int repeats = 0;
};

// Calls fn `warmup` times untimed, then `repeats` times, and returns the spread.
Timing time_it(const std::function<void()>& fn, int warmup, int repeats);

struct SuiteArgs {
  bool json = false;
  bool quick = false;  // finishes in under a minute on a 2-core machine
  unsigned threads = 0;  // 0: all hardware threads
  std::string dir = ".";  // where disk benchmarks put their files
};

class Report {
 public:
  Report(std::string bench, nlohmann::json config);
  // baseline: the name of an earlier result of this report, or "" for none.
  void add(const std::string& name, double value, const std::string& unit, const std::string& baseline = "");
  // Adds or replaces one config entry (a fact learned while measuring).
  void set_config(const std::string& key, nlohmann::json value) { config_[key] = std::move(value); }
  nlohmann::json to_json() const;
  // Prints JSON (args.json) or an aligned table.
  void print(const SuiteArgs& args) const;

 private:
  struct Row {
    std::string name, unit, baseline;
    double value;
  };
  std::string bench_;
  nlohmann::json config_;
  std::vector<Row> rows_;
};

// A fresh directory for NVMe files, removed with everything in it when it
// goes out of scope, so that each run's files are gone before the next run.
class WorkDir {
 public:
  explicit WorkDir(std::filesystem::path path) : path_(std::move(path)) {
    std::error_code ec;
    std::filesystem::create_directories(path_, ec);
  }
  WorkDir(const WorkDir&) = delete;
  WorkDir& operator=(const WorkDir&) = delete;
  ~WorkDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Whether a CUDA GPU can be used (the suites' GPU parts run only then).
bool gpu_present();

// CPU model, cores, memory, GPUs and versions: enough to tell machines apart.
nlohmann::json machine_summary();

}  // namespace kvtier::bench
