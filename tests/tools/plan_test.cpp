// `kvtier plan` as a user runs it: the JSON answer and its speed, the sweep's
// table and SVG, and one-line errors for bad input.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <unistd.h>

#include "run_kvtier.h"

using kvtier::test::check_usage_error;
using kvtier::test::lines;
using kvtier::test::Run;
using kvtier::test::run_kvtier;

namespace {

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("kvtier plan --json answers within a second with the documented keys") {
  const auto start = std::chrono::steady_clock::now();
  const Run r = run_kvtier("plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --json");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  REQUIRE(r.exit_code == 0);
  CHECK(seconds < 1.0);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  for (const char* key : {"fits", "placement", "decode_tokens_per_s", "prefill_seconds", "bottleneck", "kv_bytes",
                          "summary_bytes", "weights_bytes", "traffic_per_step", "lanes", "assumptions",
                          "max_context_tokens_that_fits"})
    CHECK_MESSAGE(j.contains(key), key);
  CHECK(j["fits"] == true);
  CHECK(j["kv_bytes"] == 137438953472ull);
  CHECK(j["decode_tokens_per_s"]["full_model"].get<double>() > 0);
}

TEST_CASE("kvtier plan prints a readable summary by default") {
  const Run r = run_kvtier("plan --model llama-3.1-8b --context 256K --machine h200,ddr5-256g,nvme-gen5 --batch 4");
  REQUIRE(r.exit_code == 0);
  for (const char* needle : {"fits: yes", "placement:", "tokens/s", "bottleneck", "prefill:", "assumptions"})
    CHECK_MESSAGE(r.out.find(needle) != std::string::npos, needle);
}

TEST_CASE("kvtier plan --sweep prints a table and writes an SVG with a line per machine") {
  const std::string svg_path = "/tmp/kvtier_plan_test_" + std::to_string(::getpid()) + ".svg";
  const Run r = run_kvtier("plan --model llama-3.1-8b --machine rtx4090,ddr5-128g,nvme-gen4 --machine "
                           "h200,ddr5-512g,nvme-gen5 --sweep context=128K:4M --svg " + svg_path);
  REQUIRE(r.exit_code == 0);
  CHECK(lines(r.out) >= 1 + 2 * 6);  // header + 6 contexts (128K..4M) per machine
  CHECK(r.out.find("4M") != std::string::npos);
  std::ifstream in(svg_path);
  REQUIRE(in.good());
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string svg = ss.str();
  std::remove(svg_path.c_str());
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  CHECK(count(svg, "class=\"full-model\"") == 2);
  CHECK(count(svg, "class=\"attention-tiering\"") == 2);
  CHECK(svg.find("rtx4090,ddr5-128g,nvme-gen4") != std::string::npos);
  CHECK(svg.find("context length") != std::string::npos);
}

TEST_CASE("kvtier plan: bad input is one line naming the problem, exit code 2") {
  struct Case {
    const char* args;
    const char* needle;
  };
  for (const Case& c :
       {Case{"plan --model gpt-5 --context 1M --machine rtx4090,ddr5-128g,nvme-gen4", "llama-3.1-8b"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx9090,ddr5-128g,nvme-gen4", "rtx4090"},
        Case{"plan --model llama-3.1-8b --context lots --machine rtx4090,ddr5-128g,nvme-gen4", "--context"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --batch 0", "--batch"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --policy topk_chunks=x",
             "topk_chunks"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --policy chunk_tokens=48",
             "chunk_tokens"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --selection-overlap 2",
             "--selection-overlap"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --selection-shares "
             "gpu=0.7,nvme=0.5",
             "--selection-shares"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --selection-shares gpu=0.7",
             "--selection-shares"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --selection-shares "
             "gpu=0.5,cpu=0.1",
             "--selection-shares"},
        Case{"plan --model llama-3.1-8b --machine rtx4090,ddr5-128g,nvme-gen4 --sweep context=128K:1M "
             "--selection-shares gpu=0.5,nvme=0.1",
             "--selection-shares with --sweep"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --gpu-budget 64GiB",
             "gpu_budget_bytes"},
        Case{"plan --model llama-3.1-8b --context 1M --machine rtx4090,ddr5-128g,nvme-gen4 --late never", "--late"},
        Case{"plan --model llama-3.1-8b --machine rtx4090,ddr5-128g,nvme-gen4 --sweep context=4M:1M", "--sweep"},
        Case{"plan --context 1M --machine rtx4090,ddr5-128g,nvme-gen4", "--model"}}) {
    check_usage_error(c.args, c.needle);
  }
}
