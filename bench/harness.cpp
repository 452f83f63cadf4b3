#include "harness.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "kvtier/core/assert.h"
#include "kvtier/gpu/device_query.h"
#include "kvtier/scheduler/machine.h"

namespace kvtier::bench {

bool gpu_present() {
  const Result<std::vector<gpu::GpuDevice>> gpus = gpu::list_gpus();
  return gpus.ok() && !gpus->empty();
}

Timing time_it(const std::function<void()>& fn, int warmup, int repeats) {
  KVT_ASSERT(repeats >= 1, "repeats=", repeats);
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const size_t n = seconds.size();
  const double median = n % 2 ? seconds[n / 2] : 0.5 * (seconds[n / 2 - 1] + seconds[n / 2]);
  return Timing{median, seconds.front(), seconds.back(), repeats};
}

Report::Report(std::string bench, nlohmann::json config) : bench_(std::move(bench)), config_(std::move(config)) {}

void Report::add(const std::string& name, double value, const std::string& unit, const std::string& baseline) {
  const bool known = baseline.empty() || std::any_of(rows_.begin(), rows_.end(),
                                                     [&](const Row& r) { return r.name == baseline; });
  KVT_ASSERT(known, "result '", name, "' names baseline '", baseline, "' that was not measured before it");
  rows_.push_back(Row{name, unit, baseline, value});
}

nlohmann::json Report::to_json() const {
  nlohmann::json results = nlohmann::json::array();
  for (const Row& r : rows_) {
    nlohmann::json row = {{"name", r.name}, {"value", r.value}, {"unit", r.unit}, {"baseline", nullptr},
                          {"ratio", nullptr}};
    for (const Row& b : rows_)
      if (!r.baseline.empty() && b.name == r.baseline) {
        row["baseline"] = b.name;
        row["ratio"] = b.value != 0 ? nlohmann::json(r.value / b.value) : nlohmann::json(nullptr);
      }
    results.push_back(row);
  }
  return {{"bench", bench_}, {"machine", machine_summary()}, {"config", config_}, {"results", results}};
}

void Report::print(const SuiteArgs& args) const {
  const nlohmann::json j = to_json();
  if (args.json) {
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::printf("%s on %s\n", bench_.c_str(), j["machine"]["cpu"].get<std::string>().c_str());
  for (const auto& r : j["results"]) {
    std::printf("  %-36s %12.3f %-8s", r["name"].get<std::string>().c_str(), r["value"].get<double>(),
                r["unit"].get<std::string>().c_str());
    if (!r["ratio"].is_null())
      std::printf("  x%.3f of %s", r["ratio"].get<double>(), r["baseline"].get<std::string>().c_str());
    std::printf("\n");
  }
}

nlohmann::json machine_summary() {
  const scheduler::MachineFacts f = scheduler::probe_machine(".");
  const nlohmann::json full = scheduler::to_json(f);
  nlohmann::json gpus = nlohmann::json::array();
  for (const auto& g : full["gpus"]) gpus.push_back(g["name"]);
  return {{"cpu", f.cpu.model_name},
          {"best_isa", full["cpu"]["best_isa"]},
          {"threads", full["cpu"].value("threads", 0)},
          {"memory_bytes", f.memory_bytes},
          {"gpus", gpus},
          {"versions", full["versions"]}};
}

}  // namespace kvtier::bench
