// A Chrome trace (Trace Event Format, JSON; readable by Perfetto and
// chrome://tracing) of what each device and queue did: one lane per device or
// queue (GPU compute, copy engine, CPU workers, io_uring), so that the overlap
// DESIGN.md section 3 is built for can be seen, and measured
// (overlap_fraction, the bench figure of the same name).
//
// Every lane is a thread (tid) of one process "kvtier" (pid 1), named by a
// thread_name metadata event. Times are microseconds on the recorder's clock
// (now_us(): steady clock since construction), or any clock the caller
// keeps consistent (the simulator's virtual clock).
//
// The buffer is bounded: once events_max events are held, later events are
// dropped and counted (dropped_events(), and "otherData.dropped_events" in
// the file), so a long run keeps its beginning intact rather than a ragged
// middle. Recording is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/core/status.h"

namespace kvtier::scheduler {

using TraceLane = uint32_t;

// A busy interval [start_us, end_us) of one lane.
struct TraceInterval {
  double start_us = 0.0;
  double end_us = 0.0;
};

// Share of wall time during which two or more lanes are busy. Wall time runs
// from the earliest start to the latest end over all lanes; a lane's own
// intervals may overlap or nest and count once. 0 when wall time is empty.
double overlap_fraction(std::span<const std::vector<TraceInterval>> lanes);

class TraceRecorder {
 public:
  static constexpr size_t kEventsMaxDefault = size_t{1} << 20;
  static constexpr size_t kLanesMax = 1024;

  explicit TraceRecorder(size_t events_max = kEventsMaxDefault);
  TraceRecorder(const TraceRecorder&) = delete;
  TraceRecorder& operator=(const TraceRecorder&) = delete;

  // The lane called `name`, registered on first use (lanes are listed in registration order).
  TraceLane lane(std::string_view name);
  // Microseconds since the recorder was made (steady clock).
  double now_us() const;

  // A span of work ("ph":"X") on `lane`: [start_us, start_us + dur_us). args: a JSON object or null.
  void complete(TraceLane lane, std::string_view name, double start_us, double dur_us,
                nlohmann::json args = nullptr);
  // A point event ("ph":"i", thread scope) on `lane`.
  void instant(TraceLane lane, std::string_view name, double ts_us, nlohmann::json args = nullptr);
  // A counter sample ("ph":"C"): values is an object of series name -> number, e.g. {"gpu": 0.8, "host": 0.3}.
  void counter(std::string_view name, double ts_us, nlohmann::json values);

  size_t events() const;          // events held (metadata excluded)
  uint64_t dropped_events() const;  // events refused because the buffer was full
  size_t events_max() const { return events_max_; }

  // The complete events of `lane` as intervals, in recording order.
  std::vector<TraceInterval> busy(TraceLane lane) const;
  // overlap_fraction() over the complete events of `lanes`.
  double overlap_fraction(std::span<const TraceLane> lanes) const;

  // {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}.
  nlohmann::json to_json() const;
  // Writes to_json() to `path`; failures name the path and the errno text.
  Status write(const std::filesystem::path& path) const;

 private:
  struct Event {
    char phase;  // 'X', 'i' or 'C'
    TraceLane lane;
    std::string name;
    double ts_us;
    double dur_us;
    nlohmann::json args;
  };
  void record(Event event);
  nlohmann::json event_json(const Event& e) const;
  std::vector<nlohmann::json> metadata_json() const;

  const size_t events_max_;
  const std::chrono::steady_clock::time_point epoch_;
  mutable std::mutex mutex_;
  std::vector<std::string> lanes_;
  std::vector<Event> events_;
  uint64_t dropped_ = 0;
};

// Records a complete event on `lane` from construction to destruction; a
// null recorder (tracing off) makes it a no-op.
class TraceScope {
 public:
  TraceScope(TraceRecorder* recorder, TraceLane lane, std::string name)
      : recorder_(recorder), lane_(lane), name_(std::move(name)), start_us_(recorder ? recorder->now_us() : 0.0) {}
  TraceScope(const TraceScope&) = delete;
  TraceScope& operator=(const TraceScope&) = delete;
  ~TraceScope() {
    if (recorder_ != nullptr) recorder_->complete(lane_, name_, start_us_, recorder_->now_us() - start_us_);
  }

 private:
  TraceRecorder* recorder_;
  TraceLane lane_;
  std::string name_;
  double start_us_;
};

}  // namespace kvtier::scheduler
