#include <doctest/doctest.h>

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "kvtier/scheduler/machine_profile.h"
#include "temp_dir.h"

using namespace kvtier;
using namespace kvtier::scheduler;
using nlohmann::json;

namespace {

namespace fs = std::filesystem;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

using test::TempDir;

MachineProfile machine(std::string_view spec) {
  Result<MachineProfile> m = compose_machine(spec);
  INFO(spec, ": ", m.status().to_string());
  REQUIRE(m.ok());
  return std::move(m).value();
}

// The error message of parsing `j` as a whole machine; "" if it parsed.
std::string parse_error(const json& j) {
  Result<MachineProfile> m = parse_machine_profile_json(j, "box.json");
  return m.ok() ? "" : m.status().message();
}

json reference_json() { return to_json(machine("rtx4090,ddr5-128g,nvme-gen4")); }

void check_round_trip(const MachineProfile& m) {
  CHECK(validate(m).ok());
  const json j = to_json(m);
  Result<MachineProfile> back = parse_machine_profile_json(json::parse(j.dump()), "round trip");
  INFO(back.status().to_string());
  REQUIRE(back.ok());
  CHECK(*back == m);
}

void check_tagged(const std::string& source) {
  INFO(source);
  CHECK(source.find("[spec]") != std::string::npos);
  // Whatever is not on a spec sheet is tagged as measured or assumed.
  CHECK((source.find("[assumption]") != std::string::npos || source.find("[measured]") != std::string::npos));
}

}  // namespace

TEST_CASE("the preset tables hold the documented parts") {
  CHECK(preset_names(MachinePart::kGpu) ==
        std::vector<std::string>{"rtx4090", "rtx5090", "rtx6000ada", "a100-80g-pcie", "h100-pcie", "h100-sxm", "h200"});
  CHECK(preset_names(MachinePart::kHost) == std::vector<std::string>{"ddr4-64g", "ddr4-128g", "ddr4-256g", "ddr5-64g",
                                                                     "ddr5-128g", "ddr5-256g", "ddr5-512g"});
  CHECK(preset_names(MachinePart::kNvme) == std::vector<std::string>{"nvme-gen4", "nvme-gen5"});
  CHECK(preset_names(MachinePart::kLink) == std::vector<std::string>{"pcie-gen4-x16", "pcie-gen5-x16"});

  const MachineProfile m = machine("rtx4090,ddr5-128g,nvme-gen4");
  CHECK(m.gpu.memory_bytes == 24564 * kMiB);
  CHECK(m.gpu.hbm_read_gbps == 1008);
  CHECK(m.gpu.bf16_tflops == doctest::Approx(165.2));
  CHECK(m.gpu.sm_count == 128);
  CHECK(m.link.name == "pcie-gen4-x16");
  CHECK(m.host.memory_bytes == 128 * kGiB);
  CHECK(m.host.read_gbps == doctest::Approx(0.75 * 2 * 8 * 4.8));  // 2 channels of DDR5-4800
  CHECK(m.host.cores == 16);
  CHECK(m.nvme.capacity_bytes == 2'000'000'000'000ULL);

  const MachineProfile h = machine("h200,ddr5-512g,nvme-gen5");
  CHECK(h.gpu.memory_bytes == 143771 * kMiB);
  CHECK(h.gpu.hbm_read_gbps == 4800);
  CHECK(h.link.name == "pcie-gen5-x16");
  CHECK(h.link.gbps_at(LinkDirection::kHostToDevice, 256 * kMiB) > 50);
  CHECK(h.host.cores == 64);
}

TEST_CASE("every preset composes, validates, carries tagged sources and round-trips through JSON") {
  for (const std::string& gpu : preset_names(MachinePart::kGpu)) {
    CAPTURE(gpu);
    const MachineProfile m = machine(gpu + ",ddr5-128g,nvme-gen4");
    check_round_trip(m);
    check_tagged(m.gpu.source);
    check_tagged(m.link.source);
  }
  for (const std::string& host : preset_names(MachinePart::kHost)) {
    CAPTURE(host);
    const MachineProfile m = machine("rtx4090," + host + ",nvme-gen4");
    check_round_trip(m);
    check_tagged(m.host.source);
    CHECK(m.host.score_gbps <= m.host.read_gbps);
    CHECK(m.host.attend_gbps <= m.host.read_gbps);
  }
  for (const std::string& nvme : preset_names(MachinePart::kNvme)) {
    CAPTURE(nvme);
    const MachineProfile m = machine("rtx4090,ddr5-128g," + nvme);
    check_round_trip(m);
    check_tagged(m.nvme.source);
  }
  for (const std::string& link : preset_names(MachinePart::kLink)) {
    CAPTURE(link);
    const MachineProfile m = machine("rtx4090," + link + ",ddr5-128g,nvme-gen4");
    CHECK(m.link.name == link);
    check_round_trip(m);
  }
}

TEST_CASE("a machine composed of three presets") {
  const MachineProfile m = machine(" rtx4090 , ddr5-128g,nvme-gen4 ");
  CHECK(m.name == "rtx4090,ddr5-128g,nvme-gen4");
  CHECK(m.gpu.name == "rtx4090");
  CHECK(m.host.name == "ddr5-128g");
  CHECK(m.nvme.name == "nvme-gen4");
  // Order does not matter.
  CHECK(machine("nvme-gen4,ddr5-128g,rtx4090").gpu == m.gpu);
}

TEST_CASE("an explicit link replaces the GPU preset's link, before or after it") {
  CHECK(machine("rtx4090,pcie-gen5-x16,ddr5-128g,nvme-gen4").link.name == "pcie-gen5-x16");
  CHECK(machine("pcie-gen5-x16,rtx4090,ddr5-128g,nvme-gen4").link.name == "pcie-gen5-x16");
  const Result<MachineProfile> twice = compose_machine("rtx4090,pcie-gen5-x16,pcie-gen4-x16,ddr5-128g,nvme-gen4");
  REQUIRE(!twice.ok());
  CHECK(twice.status().message().find("two link parts") != std::string::npos);
}

TEST_CASE("machines composed from JSON files: whole machines and single parts") {
  const TempDir dir("kvtier-machine-profile-test");
  const json whole = to_json(machine("h100-sxm,ddr5-256g,nvme-gen5"));

  SUBCASE("a whole machine in one file") {
    json named = whole;
    named["name"] = "lab box";
    const std::string path = dir.write("box.json", named.dump(2));
    const MachineProfile m = machine(path);
    CHECK(m.name == "lab box");
    CHECK(m.gpu.name == "h100-sxm");
    const Result<MachineProfile> loaded = load_machine_profile(path);
    REQUIRE(loaded.ok());
    CHECK(*loaded == m);
  }
  SUBCASE("one part per file, mixed with presets") {
    const std::string host = dir.write("host.json", json{{"host", whole["host"]}}.dump());
    const std::string gpu = dir.write("gpu.json", json{{"gpu", whole["gpu"]}, {"link", whole["link"]}}.dump());
    const MachineProfile m = machine(gpu + "," + host + ",nvme-gen4");
    CHECK(m.gpu.name == "h100-sxm");
    CHECK(m.link.name == "pcie-gen5-x16");
    CHECK(m.host.name == "ddr5-256g");
    CHECK(m.nvme.name == "nvme-gen4");
    CHECK(m.name == gpu + "," + host + ",nvme-gen4");
  }
  SUBCASE("a calibrated host part with its own numbers") {
    json host = whole["host"];
    host["name"] = "my-threadripper";
    host["read_gbps"] = 181.5;
    const std::string path = dir.write("tr.json", json{{"host", host}}.dump());
    const MachineProfile m = machine("rtx5090," + path + ",nvme-gen5");
    CHECK(m.host.name == "my-threadripper");
    CHECK(m.host.read_gbps == 181.5);
  }
  SUBCASE("a file gpu without a link needs a link part") {
    const std::string gpu = dir.write("gpu-only.json", json{{"gpu", whole["gpu"]}}.dump());
    const Result<MachineProfile> m = compose_machine(gpu + ",ddr5-128g,nvme-gen4");
    REQUIRE(!m.ok());
    CHECK(m.status().message().find("no link part") != std::string::npos);
    CHECK(m.status().message().find("pcie-gen4-x16") != std::string::npos);
    CHECK(machine(gpu + ",pcie-gen4-x16,ddr5-128g,nvme-gen4").link.name == "pcie-gen4-x16");
  }
}

TEST_CASE("bad compositions say what is wrong and what is known") {
  const TempDir dir("kvtier-machine-profile-test");
  auto error_of = [](std::string_view spec) {
    const Result<MachineProfile> m = compose_machine(spec);
    REQUIRE(!m.ok());
    return m.status();
  };

  const Status unknown = error_of("rtx4080,ddr5-128g,nvme-gen4");
  CHECK(unknown.code() == StatusCode::kNotFound);
  for (const char* s : {"'rtx4080'", "rtx4090", "h200", "ddr4-64g", "ddr5-512g", "nvme-gen5", "pcie-gen5-x16"})
    CHECK_MESSAGE(unknown.message().find(s) != std::string::npos, unknown.message(), " lacks ", s);

  CHECK(error_of("rtx4090,h100-sxm,ddr5-128g,nvme-gen4")
            .message()
            .find("two gpu parts, from 'rtx4090' and from 'h100-sxm'") != std::string::npos);
  CHECK(error_of("rtx4090,ddr5-128g,ddr4-64g,nvme-gen4").message().find("two host parts") != std::string::npos);
  const Status no_nvme = error_of("rtx4090,ddr5-128g");
  CHECK(no_nvme.message().find("no nvme part") != std::string::npos);
  CHECK(no_nvme.message().find("nvme-gen4, nvme-gen5") != std::string::npos);
  CHECK(error_of("ddr5-128g,nvme-gen4").message().find("no gpu part") != std::string::npos);
  CHECK(error_of("").message().find("empty") != std::string::npos);
  CHECK(error_of("rtx4090,,nvme-gen4").message().find("empty part") != std::string::npos);

  const std::string junk = dir.write("junk.json", "{ not json");
  const Status not_json = error_of("rtx4090," + junk + ",nvme-gen4");
  CHECK(not_json.message().find(junk) != std::string::npos);
  CHECK(not_json.message().find("not valid JSON") != std::string::npos);

  const std::string typo = dir.write("typo.json", R"({"hosts": {}})");
  const Status bad_key = error_of("rtx4090," + typo + ",nvme-gen4");
  CHECK(bad_key.message().find(typo) != std::string::npos);
  CHECK(bad_key.message().find("unknown key 'hosts' at the top level") != std::string::npos);

  json host = reference_json()["host"];
  host["read_gbps"] = 0;
  const std::string zero = dir.write("zero.json", json{{"host", host}}.dump());
  const Status zero_rate = error_of("rtx4090," + zero + ",nvme-gen4");
  CHECK(zero_rate.message().find(zero + ": machine profile host.read_gbps = 0: must be > 0") != std::string::npos);

  CHECK(error_of("rtx4090,/nonexistent/dir/host.json,nvme-gen4").code() == StatusCode::kNotFound);
}

TEST_CASE("impossible machines are rejected with the field's path") {
  struct Case {
    const char* what;
    json::json_pointer field;
    json value;
    const char* expected;
  };
  const Case cases[] = {
      {"zero bandwidth", json::json_pointer("/gpu/hbm_read_gbps"), 0,
       "machine profile gpu.hbm_read_gbps = 0: must be > 0"},
      {"negative rate", json::json_pointer("/gpu/bf16_tflops"), -1.5, "gpu.bf16_tflops = -1.5: must be > 0"},
      {"zero SMs", json::json_pointer("/gpu/sm_count"), 0, "gpu.sm_count = 0: must be > 0"},
      {"wrong type", json::json_pointer("/gpu/sm_count"), "many", "gpu.sm_count = \"many\": must be a whole number"},
      {"stand-in not a boolean", json::json_pointer("/gpu/cpu_standin"), "yes",
       "gpu.cpu_standin = \"yes\": must be true or false"},
      {"fraction", json::json_pointer("/gpu/memory_bytes"), 1.5, "gpu.memory_bytes = 1.5: must be a whole number"},
      {"negative size", json::json_pointer("/host/memory_bytes"), -5, "host.memory_bytes = -5: must be > 0"},
      {"zero cores", json::json_pointer("/host/cores"), 0, "host.cores = 0: must be > 0"},
      {"string rate", json::json_pointer("/host/attend_gbps"), "fast", "host.attend_gbps = \"fast\": must be a number"},
      {"empty name", json::json_pointer("/host/name"), "", "host.name is empty"},
      {"negative host time", json::json_pointer("/host/plan_us_per_block"), -0.5,
       "host.plan_us_per_block = -0.5: must be >= 0"},
      {"negative curve point", json::json_pointer("/link/h2d/0/gbps"), -1, "link.h2d[0].gbps = -1: must be > 0"},
      {"zero-byte point", json::json_pointer("/link/d2h/2/bytes"), 0, "link.d2h[2].bytes = 0: must be > 0"},
      {"empty curve", json::json_pointer("/link/h2d"), json::array(), "link.h2d is empty"},
      {"curve not an array", json::json_pointer("/link/h2d"), 25, "link.h2d = 25: must be an array"},
      {"duplex over 1", json::json_pointer("/link/duplex_factor"), 1.5, "link.duplex_factor = 1.5: must be <= 1"},
      {"zero capacity", json::json_pointer("/nvme/capacity_bytes"), 0, "nvme.capacity_bytes = 0: must be > 0"},
      {"zero latency", json::json_pointer("/nvme/latency_us"), 0, "nvme.latency_us = 0: must be > 0"},
      {"zero queue depth", json::json_pointer("/nvme/read/0/queue_depth"), 0,
       "nvme.read[0].queue_depth = 0: must be > 0"},
      {"part not an object", json::json_pointer("/nvme"), "fast", "nvme = \"fast\": must be a JSON object"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    json j = reference_json();
    j[c.field] = c.value;
    const std::string message = parse_error(j);
    CHECK_MESSAGE(message.find(c.expected) != std::string::npos, message);
    CHECK(message.rfind("box.json: ", 0) == 0);  // the origin comes first
  }

  SUBCASE("missing fields and parts") {
    json j = reference_json();
    j["nvme"].erase("latency_us");
    CHECK(parse_error(j).find("machine profile nvme.latency_us is missing") != std::string::npos);
    j = reference_json();
    j["host"].erase("step_overhead_us");  // a profile from before the executor's host time was measured
    CHECK(parse_error(j).find("host.step_overhead_us is missing") != std::string::npos);
    CHECK(parse_error(j).find("run kvtier calibrate again") != std::string::npos);
    j = reference_json();
    j["host"].erase("attend_call_us");  // a profile from before the call cost was measured
    CHECK(parse_error(j).find("host.attend_call_us is missing") != std::string::npos);
    j = reference_json();
    j["host"].erase("topk_gbps");  // a profile from before top-k had its own rate
    CHECK(parse_error(j).find("host.topk_gbps is missing") != std::string::npos);
    CHECK(parse_error(j).find("copy host.topk_gbps from a host preset") != std::string::npos);
    j = reference_json();
    j.erase("gpu");
    CHECK(parse_error(j).find("machine profile gpu is missing") != std::string::npos);
    CHECK(parse_error(json::array()).find("top level must be a JSON object") != std::string::npos);
    CHECK(parse_error(json::object()).find("none of the parts") != std::string::npos);
  }
  SUBCASE("a misspelt key is not ignored") {
    json j = reference_json();
    j["gpu"]["hbm_gbps"] = 1000;
    CHECK(parse_error(j).find("unknown key 'hbm_gbps' in gpu") != std::string::npos);
    j = reference_json();
    j["link"]["h2d"][0]["size"] = 1;
    CHECK(parse_error(j).find("unknown key 'size' in link.h2d[0]") != std::string::npos);
  }
  SUBCASE("a curve with a size twice") {
    json j = reference_json();
    j["link"]["h2d"][1]["bytes"] = j["link"]["h2d"][0]["bytes"];
    CHECK(parse_error(j).find("machine profile link.h2d has two points at bytes=4096") != std::string::npos);
  }
  SUBCASE("an NVMe table with a hole") {
    json j = reference_json();
    j["nvme"]["read"].erase(3);  // 4 KiB at queue depth 32
    const std::string message = parse_error(j);
    CHECK_MESSAGE(message.find("nvme.read is not a full grid: no point for request_bytes=4096 at queue_depth=32") !=
                      std::string::npos,
                  message);
    j = reference_json();
    j["nvme"]["write"].push_back(j["nvme"]["write"][0]);
    CHECK(parse_error(j).find("nvme.write has two points at request_bytes=4096, queue_depth=1") != std::string::npos);
  }
  SUBCASE("validate() names the sorted index of a repeated size") {
    MachineProfile m = machine("rtx4090,ddr5-128g,nvme-gen4");
    m.link.h2d.points[1].bytes = m.link.h2d.points[0].bytes;
    CHECK(validate(m).message().find("link.h2d[1].bytes = 4096: must be greater than the previous point's 4096") !=
          std::string::npos);
  }
  SUBCASE("validate() checks profiles built in code") {
    MachineProfile m = machine("rtx4090,ddr5-128g,nvme-gen4");
    m.gpu.hbm_read_gbps = 0;
    CHECK(validate(m).message() == "machine profile gpu.hbm_read_gbps = 0: must be > 0");
    m = machine("rtx4090,ddr5-128g,nvme-gen4");
    m.link.duplex_factor = std::nan("");
    CHECK(validate(m).message().find("link.duplex_factor = nan: must be a finite number") != std::string::npos);
  }
}

TEST_CASE("curves given out of order are sorted") {
  json j = reference_json();
  json reversed = json::array();
  for (auto it = j["link"]["h2d"].rbegin(); it != j["link"]["h2d"].rend(); ++it) reversed.push_back(*it);
  j["link"]["h2d"] = reversed;
  json grid = j["nvme"]["read"];
  std::reverse(grid.begin(), grid.end());
  j["nvme"]["read"] = grid;
  Result<MachineProfile> m = parse_machine_profile_json(j, "reversed");
  REQUIRE(m.ok());
  CHECK(*m == machine("rtx4090,ddr5-128g,nvme-gen4"));
}

TEST_CASE("link bandwidth interpolates log-linearly in size, monotonic and clamped") {
  for (const std::string& name : preset_names(MachinePart::kLink)) {
    CAPTURE(name);
    const LinkProfile link = machine("rtx4090," + name + ",ddr5-128g,nvme-gen4").link;
    const auto& pts = link.h2d.points;
    const auto h2d = [&](uint64_t bytes) { return link.gbps_at(LinkDirection::kHostToDevice, bytes); };
    CHECK(h2d(0) == pts.front().gbps);
    CHECK(h2d(1) == pts.front().gbps);
    CHECK(h2d(uint64_t{1} << 50) == pts.back().gbps);
    for (const BandwidthPoint& p : pts) CHECK(h2d(p.bytes) == doctest::Approx(p.gbps));
    // 8 KiB lies halfway between 4 KiB and 16 KiB in log(size).
    CHECK(h2d(8 * kKiB) == doctest::Approx((pts[0].gbps + pts[1].gbps) / 2));
    double previous = 0;
    for (double bytes = 512; bytes < 4.0 * kGiB; bytes *= 1.19) {
      const double g = h2d(static_cast<uint64_t>(bytes));
      CHECK(g >= previous);
      previous = g;
    }
    CHECK(link.gbps_at(LinkDirection::kDeviceToHost, kMiB, true) ==
          doctest::Approx(link.duplex_factor * link.gbps_at(LinkDirection::kDeviceToHost, kMiB)));
    // The design's point: 32 KiB copies one by one reach a fraction of PCIe.
    CHECK(h2d(32 * kKiB) < 0.2 * h2d(256 * kMiB));
  }
}

TEST_CASE("NVMe throughput interpolates over the (size, depth) grid, monotonic and clamped") {
  SUBCASE("a 2 x 2 grid by hand") {
    NvmeCurve c;
    c.points = {{4096, 1, 1.0}, {4096, 4, 2.0}, {16384, 1, 3.0}, {16384, 4, 4.0}};
    CHECK(c.gbps_at(4096, 1) == 1.0);
    CHECK(c.gbps_at(16384, 4) == 4.0);
    CHECK(c.gbps_at(8192, 2) == doctest::Approx(2.5));  // log-midpoint in both
    CHECK(c.gbps_at(4096, 2) == doctest::Approx(1.5));
    CHECK(c.gbps_at(8192, 1) == doctest::Approx(2.0));
    CHECK(c.gbps_at(1, 0) == 1.0);
    CHECK(c.gbps_at(1 << 30, 1000) == 4.0);
    CHECK(c.gbps_at(1 << 30, 1) == 3.0);
  }
  for (const std::string& name : preset_names(MachinePart::kNvme)) {
    CAPTURE(name);
    const NvmeProfile nvme = machine("rtx4090,ddr5-128g," + name).nvme;
    for (const NvmePoint& p : nvme.read.points)
      CHECK(nvme.read_gbps_at(p.request_bytes, p.queue_depth) == doctest::Approx(p.gbps));
    for (uint32_t qd = 1; qd <= 128; qd *= 2) {
      double previous = 0;
      for (double bytes = 1024; bytes < 16.0 * kMiB; bytes *= 1.3) {
        const double g = nvme.read_gbps_at(static_cast<uint64_t>(bytes), qd);
        CHECK(g >= previous);
        previous = g;
      }
    }
    for (uint64_t bytes = 4 * kKiB; bytes <= 4 * kMiB; bytes *= 2) {
      double previous = 0;
      for (uint32_t qd = 1; qd <= 256; ++qd) {
        const double g = nvme.write_gbps_at(bytes, qd);
        CHECK(g >= previous);
        previous = g;
      }
    }
    // Small reads at QD1 collapse; deep queues recover most of the drive.
    CHECK(nvme.read_gbps_at(32 * kKiB, 1) < 0.7);
    CHECK(nvme.read_gbps_at(32 * kKiB, 32) > 5 * nvme.read_gbps_at(32 * kKiB, 1));
    CHECK(nvme.read_gbps_at(1, 0) == nvme.read.points.front().gbps);
    CHECK(nvme.read_gbps_at(uint64_t{1} << 40, 1u << 20) == nvme.read.points.back().gbps);
  }
}

TEST_CASE("the example in docs/machine-profile.md is a valid machine") {
  std::ifstream in(std::string(KVTIER_SOURCE_DIR) + "/docs/machine-profile.md");
  REQUIRE(in.good());
  const std::string doc((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t start = doc.find("```json\n");
  REQUIRE(start != std::string::npos);
  const size_t end = doc.find("```", start + 8);
  REQUIRE(end != std::string::npos);
  const json j = json::parse(doc.substr(start + 8, end - start - 8));
  const Result<MachineProfile> m = parse_machine_profile_json(j, "docs/machine-profile.md");
  INFO(m.status().to_string());
  REQUIRE(m.ok());
  CHECK(m->name == "lab box");
  CHECK(m->nvme.read_gbps_at(32768, 32) == doctest::Approx(6.1));
}
