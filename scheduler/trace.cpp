#include "kvtier/scheduler/trace.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <utility>

#include "kvtier/core/assert.h"

namespace kvtier::scheduler {
namespace {

constexpr int kPid = 1;

// Never throws: names that are not UTF-8 get U+FFFD instead of an exception.
std::string dump(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

// A lane's intervals merged into disjoint, sorted ones; empty intervals dropped.
std::vector<TraceInterval> merged(std::vector<TraceInterval> in) {
  std::erase_if(in, [](const TraceInterval& i) { return !(i.end_us > i.start_us); });
  std::sort(in.begin(), in.end(),
            [](const TraceInterval& a, const TraceInterval& b) { return a.start_us < b.start_us; });
  std::vector<TraceInterval> out;
  for (const TraceInterval& i : in) {
    if (!out.empty() && i.start_us <= out.back().end_us)
      out.back().end_us = std::max(out.back().end_us, i.end_us);
    else
      out.push_back(i);
  }
  return out;
}

}  // namespace

double overlap_fraction(std::span<const std::vector<TraceInterval>> lanes) {
  // Sweep over the endpoints of every lane's merged intervals: +1 at a start,
  // -1 at an end. Within one lane intervals are disjoint, so the count is the
  // number of busy lanes.
  std::vector<std::pair<double, int>> edges;
  for (const std::vector<TraceInterval>& lane : lanes)
    for (const TraceInterval& i : merged(lane)) {
      edges.emplace_back(i.start_us, +1);
      edges.emplace_back(i.end_us, -1);
    }
  if (edges.empty()) return 0.0;
  std::sort(edges.begin(), edges.end());
  const double wall_us = edges.back().first - edges.front().first;
  if (!(wall_us > 0.0)) return 0.0;
  double overlapped_us = 0.0;
  int busy = 0;
  for (size_t e = 0; e < edges.size(); ++e) {
    if (e > 0 && busy >= 2) overlapped_us += edges[e].first - edges[e - 1].first;
    busy += edges[e].second;
  }
  return overlapped_us / wall_us;
}

TraceRecorder::TraceRecorder(size_t events_max) : events_max_(events_max), epoch_(std::chrono::steady_clock::now()) {
  KVT_ASSERT(events_max > 0, "a trace needs room for at least one event");
}

TraceLane TraceRecorder::lane(std::string_view name) {
  std::lock_guard lock(mutex_);
  const auto it = std::find(lanes_.begin(), lanes_.end(), name);
  if (it != lanes_.end()) return static_cast<TraceLane>(it - lanes_.begin());
  KVT_ASSERT(lanes_.size() < kLanesMax, "trace lane '", name, "' would be lane ", lanes_.size(), ", past ", kLanesMax);
  lanes_.emplace_back(name);
  return static_cast<TraceLane>(lanes_.size() - 1);
}

double TraceRecorder::now_us() const {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - epoch_).count();
}

void TraceRecorder::record(Event event) {
  std::lock_guard lock(mutex_);
  KVT_ASSERT(event.phase == 'C' || event.lane < lanes_.size(), "trace lane ", event.lane, " of ", lanes_.size());
  if (events_.size() >= events_max_) {
    ++dropped_;
    return;
  }
  events_.push_back(std::move(event));
}

void TraceRecorder::complete(TraceLane lane, std::string_view name, double start_us, double dur_us,
                             nlohmann::json args) {
  record({'X', lane, std::string(name), start_us, std::max(dur_us, 0.0), std::move(args)});
}

void TraceRecorder::instant(TraceLane lane, std::string_view name, double ts_us, nlohmann::json args) {
  record({'i', lane, std::string(name), ts_us, 0.0, std::move(args)});
}

void TraceRecorder::counter(std::string_view name, double ts_us, nlohmann::json values) {
  KVT_ASSERT(values.is_object(), "counter '", name, "' needs an object of series -> number, got ", dump(values));
  record({'C', 0, std::string(name), ts_us, 0.0, std::move(values)});
}

size_t TraceRecorder::events() const {
  std::lock_guard lock(mutex_);
  return events_.size();
}

uint64_t TraceRecorder::dropped_events() const {
  std::lock_guard lock(mutex_);
  return dropped_;
}

std::vector<TraceInterval> TraceRecorder::busy(TraceLane lane) const {
  std::lock_guard lock(mutex_);
  std::vector<TraceInterval> out;
  for (const Event& e : events_)
    if (e.phase == 'X' && e.lane == lane) out.push_back({e.ts_us, e.ts_us + e.dur_us});
  return out;
}

double TraceRecorder::overlap_fraction(std::span<const TraceLane> lanes) const {
  std::vector<std::vector<TraceInterval>> intervals;
  for (TraceLane l : lanes) intervals.push_back(busy(l));
  return scheduler::overlap_fraction(intervals);
}

// Lane i is tid i + 1; tid 0 carries the process's counters.
nlohmann::json TraceRecorder::event_json(const Event& e) const {
  nlohmann::json j = {{"ph", std::string(1, e.phase)}, {"pid", kPid}, {"name", e.name}, {"ts", e.ts_us}};
  if (e.phase != 'C') j["tid"] = e.lane + 1;
  if (e.phase == 'X') j["dur"] = e.dur_us;
  if (e.phase == 'i') j["s"] = "t";
  if (!e.args.is_null()) j["args"] = e.args;
  return j;
}

std::vector<nlohmann::json> TraceRecorder::metadata_json() const {
  std::vector<nlohmann::json> out;
  out.push_back({{"ph", "M"}, {"pid", kPid}, {"tid", 0}, {"name", "process_name"}, {"args", {{"name", "kvtier"}}}});
  for (size_t i = 0; i < lanes_.size(); ++i) {
    const int tid = static_cast<int>(i + 1);
    out.push_back({{"ph", "M"}, {"pid", kPid}, {"tid", tid}, {"name", "thread_name"}, {"args", {{"name", lanes_[i]}}}});
    out.push_back({{"ph", "M"}, {"pid", kPid}, {"tid", tid}, {"name", "thread_sort_index"},
                   {"args", {{"sort_index", tid}}}});
  }
  return out;
}

nlohmann::json TraceRecorder::to_json() const {
  std::lock_guard lock(mutex_);
  nlohmann::json events = metadata_json();
  for (const Event& e : events_) events.push_back(event_json(e));
  return {{"traceEvents", std::move(events)},
          {"displayTimeUnit", "ms"},
          {"otherData", {{"dropped_events", dropped_}, {"events_max", events_max_}}}};
}

Status TraceRecorder::write(const std::filesystem::path& path) const {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return io_error("cannot open trace file " + path.string() + " for writing: " + std::strerror(errno));
  // Written event by event: a full run's trace is too big to build as one JSON value first.
  {
    std::lock_guard lock(mutex_);
    out << "{\"displayTimeUnit\":\"ms\",\"otherData\":"
        << dump({{"dropped_events", dropped_}, {"events_max", events_max_}}) << ",\"traceEvents\":[\n";
    bool first = true;
    for (const nlohmann::json& m : metadata_json()) out << (std::exchange(first, false) ? "" : ",\n") << dump(m);
    for (const Event& e : events_) out << ",\n" << dump(event_json(e));
    out << "\n]}\n";
  }
  out.close();
  if (!out) return io_error("writing trace file " + path.string() + " failed: " + std::strerror(errno));
  return Status::ok_status();
}

}  // namespace kvtier::scheduler
