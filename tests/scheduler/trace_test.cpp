#include <doctest/doctest.h>

#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvtier/scheduler/trace.h"
#include "temp_dir.h"

using namespace kvtier;
using namespace kvtier::scheduler;
using nlohmann::json;

namespace {

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return json::parse(in);  // throws (and fails the test) on malformed JSON
}

}  // namespace

TEST_CASE("trace: events from several threads make a valid Chrome trace with named lanes") {
  TraceRecorder trace;
  const std::vector<std::string> names = {"GPU compute", "copy engine", "CPU worker 0", "CPU worker 1", "io_uring"};
  std::vector<TraceLane> lanes;
  for (const std::string& n : names) lanes.push_back(trace.lane(n));
  CHECK(trace.lane("copy engine") == lanes[1]);  // registration is idempotent

  const int per_thread = 500;
  std::vector<std::thread> threads;
  for (size_t t = 0; t < lanes.size(); ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        TraceScope scope(&trace, lanes[t], "work");
        trace.complete(lanes[t], "step", 10.0 * i, 5.0, {{"layer", i % 32}, {"blocks", 64}});
        if (i % 100 == 0) trace.instant(lanes[t], "mark", 10.0 * i);
      }
      trace.counter("tier fill", 1.0 * t, {{"gpu", 0.5}, {"host", 0.25}});
    });
  for (std::thread& th : threads) th.join();
  const size_t expected = lanes.size() * (2 * per_thread + per_thread / 100 + 1);
  CHECK(trace.events() == expected);
  CHECK(trace.dropped_events() == 0);

  test::TempDir dir("kvtier-trace");
  const auto path = dir.path() / "run.json";
  const Status st = trace.write(path);
  INFO(st.to_string());
  REQUIRE(st.ok());
  const json doc = read_json(path);
  CHECK(doc["displayTimeUnit"] == "ms");
  CHECK(doc["otherData"]["dropped_events"] == 0);
  const json& events = doc["traceEvents"];
  REQUIRE(events.is_array());

  std::map<int, std::string> thread_names;
  std::map<std::string, size_t> phases;
  bool process_named = false;
  for (const json& e : events) {
    REQUIRE(e.contains("ph"));
    CHECK(e["pid"] == 1);
    const std::string ph = e["ph"];
    ++phases[ph];
    if (ph == "M" && e["name"] == "thread_name") thread_names[e["tid"].get<int>()] = e["args"]["name"];
    if (ph == "M" && e["name"] == "process_name") process_named = e["args"]["name"] == "kvtier";
    if (ph == "X") {
      CHECK(e["dur"].get<double>() >= 0.0);
      CHECK(e.contains("ts"));
      CHECK(thread_names.count(e["tid"].get<int>()) == 1);  // metadata comes first
    }
    if (ph == "C") CHECK(e["args"]["gpu"] == 0.5);
  }
  CHECK(process_named);
  REQUIRE(thread_names.size() == names.size());
  for (size_t i = 0; i < names.size(); ++i) CHECK(thread_names[static_cast<int>(lanes[i] + 1)] == names[i]);
  CHECK(phases["X"] == lanes.size() * 2 * per_thread);
  CHECK(phases["i"] == lanes.size() * per_thread / 100);
  CHECK(phases["C"] == lanes.size());

  // to_json() is the same document.
  const json mem = trace.to_json();
  CHECK(mem["traceEvents"].size() == events.size());
  CHECK(mem["displayTimeUnit"] == "ms");
}

TEST_CASE("trace: a full buffer drops later events and counts them") {
  TraceRecorder trace(10);
  const TraceLane gpu = trace.lane("GPU compute");
  for (int i = 0; i < 25; ++i) trace.complete(gpu, "kernel", i, 1.0);
  CHECK(trace.events() == 10);
  CHECK(trace.dropped_events() == 15);
  const std::vector<TraceInterval> kept = trace.busy(gpu);
  REQUIRE(kept.size() == 10);
  CHECK(kept.front().start_us == 0.0);  // the beginning is kept
  CHECK(kept.back().start_us == 9.0);
  CHECK(trace.to_json()["otherData"]["dropped_events"] == 15);
}

TEST_CASE("trace: overlap_fraction on hand-built intervals") {
  using L = std::vector<TraceInterval>;
  // Wall time 0..10; lanes overlap on [2, 4) and [6, 7): 3 of 10.
  CHECK(overlap_fraction(std::vector<L>{L{{0, 4}, {6, 10}}, L{{2, 7}}}) == doctest::Approx(0.3));
  // Nested and overlapping intervals of one lane count once: no overlap at all.
  CHECK(overlap_fraction(std::vector<L>{L{{0, 5}, {1, 2}, {4, 8}}, L{{8, 10}}}) == 0.0);
  // Three lanes: >= 2 busy on [1, 3) and [5, 6): 3 of 8.
  CHECK(overlap_fraction(std::vector<L>{L{{0, 3}}, L{{1, 6}}, L{{5, 8}}}) == doctest::Approx(3.0 / 8.0));
  // Idle gaps count as wall time: overlap [0, 1) and [9, 10) of 10.
  CHECK(overlap_fraction(std::vector<L>{L{{0, 1}, {9, 10}}, L{{0, 1}, {9, 10}}}) == doctest::Approx(0.2));
  // Full overlap, touching intervals, empty input and zero-length intervals.
  CHECK(overlap_fraction(std::vector<L>{L{{2, 4}}, L{{2, 4}}}) == 1.0);
  CHECK(overlap_fraction(std::vector<L>{L{{0, 1}}, L{{1, 2}}}) == 0.0);
  CHECK(overlap_fraction(std::vector<L>{}) == 0.0);
  CHECK(overlap_fraction(std::vector<L>{L{{3, 3}}, L{{3, 3}}}) == 0.0);

  // The recorder's version reads its lanes' complete events; other lanes and instants do not count.
  TraceRecorder trace;
  const TraceLane gpu = trace.lane("GPU compute"), cpu = trace.lane("CPU worker 0"), io = trace.lane("io_uring");
  trace.complete(gpu, "attend", 0, 4);
  trace.complete(gpu, "attend", 6, 4);
  trace.complete(cpu, "score", 2, 5);
  trace.complete(io, "read", 0, 10);
  trace.instant(cpu, "select", 9);
  CHECK(trace.overlap_fraction(std::vector<TraceLane>{gpu, cpu}) == doctest::Approx(0.3));
  CHECK(trace.overlap_fraction(std::vector<TraceLane>{gpu, cpu, io}) == doctest::Approx(1.0));
  CHECK(trace.overlap_fraction(std::vector<TraceLane>{gpu}) == 0.0);
}

TEST_CASE("trace: writing to an unwritable path fails and names it") {
  TraceRecorder trace;
  trace.complete(trace.lane("GPU compute"), "x", 0, 1);
  test::TempDir dir("kvtier-trace");
  const auto path = dir.path() / "no-such-dir" / "run.json";
  const Status st = trace.write(path);
  REQUIRE_FALSE(st.ok());
  CHECK(st.code() == StatusCode::kIoError);
  CHECK(st.message().find(path.string()) != std::string::npos);
  CHECK(st.message().find("No such file") != std::string::npos);
}

TEST_CASE("trace: now_us runs forward and a null-recorder scope does nothing") {
  TraceRecorder trace;
  const double a = trace.now_us();
  const double b = trace.now_us();
  CHECK(a >= 0.0);
  CHECK(b >= a);
  { TraceScope off(nullptr, 0, "ignored"); }
  CHECK(trace.events() == 0);
}
