// `kvtier plan` for the CLI (plan.h): model and machine resolution, policy
// overrides, and the text, table and SVG renderings of simulator reports.
#include "kvtier/runtime/plan.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "kvtier/core/sizes.h"
#include "kvtier/runtime/model_catalog.h"
#include "kvtier/scheduler/machine_profile.h"

namespace kvtier::runtime {
namespace {

std::string num(double x, const char* format = "%.3g") {
  char text[48];
  std::snprintf(text, sizeof text, format, x);
  return text;
}

std::string percent(double share) { return num(100 * share, "%.0f") + "%"; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  for (size_t at = 0;;) {
    const size_t next = s.find(sep, at);
    parts.push_back(trim(s.substr(at, next == std::string_view::npos ? std::string_view::npos : next - at)));
    if (next == std::string_view::npos) return parts;
    at = next + 1;
  }
}

Result<uint32_t> parse_u32(std::string_view key, std::string_view text) {
  uint32_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size())
    return invalid_argument("policy " + std::string(key) + "='" + std::string(text) + "' is not a whole number");
  return v;
}

Status apply_override(SparsityPolicy& p, std::string_view key, std::string_view value) {
  const std::string k(key);
  if (key == "sink_tokens" || key == "window_tokens" || key == "chunk_tokens") {
    Result<uint64_t> tokens = parse_tokens(value);
    if (!tokens.ok()) return tokens.status().with_context("policy " + k);
    if (key == "sink_tokens") p.sink_tokens = *tokens;
    if (key == "window_tokens") p.window_tokens = *tokens;
    if (key == "chunk_tokens") {
      if (*tokens > UINT32_MAX) return invalid_argument("policy chunk_tokens=" + std::string(value) + " is too large");
      p.chunk_tokens = static_cast<uint32_t>(*tokens);
    }
    return Status::ok_status();
  }
  if (key == "topk_chunks") {
    KVT_ASSIGN_OR_RETURN(p.topk_chunks, parse_u32(key, value));
    return Status::ok_status();
  }
  if (key == "summary") {
    KVT_ASSIGN_OR_RETURN(p.summary_kind, parse_summary_kind(value));
    return Status::ok_status();
  }
  if (key == "far_field") {
    KVT_ASSIGN_OR_RETURN(p.far_field, parse_far_field(value));
    return Status::ok_status();
  }
  return invalid_argument("policy key '" + k +
                          "' is unknown (known: sink_tokens, window_tokens, chunk_tokens, topk_chunks, summary, "
                          "far_field)");
}

}  // namespace

Result<scheduler::SimModel> resolve_model(std::string_view name_or_path) {
  Result<ModelPreset> preset = find_model(name_or_path);
  std::error_code ec;
  if (!preset.ok() && std::filesystem::is_regular_file(std::string(name_or_path), ec))
    preset = load_model_config(std::string(name_or_path));
  if (!preset.ok()) return preset.status();
  KVT_RETURN_IF_ERROR(validate(*preset));
  scheduler::SimModel m;
  m.name = preset->name;
  m.shape = preset->shape;
  m.parameters = preset->parameters;
  m.weights_bytes = preset->weights_bytes;
  m.max_positions = preset->max_positions;
  return m;
}

Result<SparsityPolicy> parse_policy_overrides(std::string_view text, SparsityPolicy base) {
  if (trim(text).empty()) return base;
  for (std::string_view item : split(text, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos)
      return invalid_argument("policy item '" + std::string(item) + "' is not key=value");
    KVT_RETURN_IF_ERROR(apply_override(base, trim(item.substr(0, eq)), trim(item.substr(eq + 1))));
  }
  KVT_RETURN_IF_ERROR(validate(base));
  return base;
}

Result<MeasuredSelection> parse_selection_shares(std::string_view text) {
  const std::string why = "'" + std::string(text) + "': give gpu=G,nvme=N, each in [0, 1], G + N <= 1";
  MeasuredSelection m;
  bool gpu = false, nvme = false;
  for (std::string_view item : split(text, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) return invalid_argument(why);
    const std::string_view key = trim(item.substr(0, eq));
    const std::string value(trim(item.substr(eq + 1)));
    char* stop = nullptr;
    const double v = std::strtod(value.c_str(), &stop);
    if (value.empty() || *stop != '\0' || !(v >= 0 && v <= 1)) return invalid_argument(why);
    bool& seen = key == "gpu" ? gpu : nvme;
    if ((key != "gpu" && key != "nvme") || seen) return invalid_argument(why);
    (key == "gpu" ? m.gpu_share : m.nvme_share) = v;
    seen = true;
  }
  if (!gpu || !nvme || m.gpu_share + m.nvme_share > 1 + 1e-9) return invalid_argument(why);
  return m;
}

Result<PlanReport> plan(const PlanRequest& q) {
  KVT_ASSIGN_OR_RETURN(scheduler::SimModel model, resolve_model(q.model));
  KVT_ASSIGN_OR_RETURN(scheduler::MachineProfile machine, scheduler::compose_machine(q.machine));
  if (machine.name.empty()) machine.name = q.machine;
  scheduler::SimInputs in;
  in.model = std::move(model);
  in.context_tokens = q.context_tokens;
  in.batch = q.batch;
  in.policy = q.policy;
  in.machine = std::move(machine);
  in.late = q.late;
  in.gpu_budget_bytes = q.gpu_budget_bytes;
  in.host_budget_bytes = q.host_budget_bytes;
  in.host_cache_bytes = q.host_cache_bytes;
  in.selection_overlap = q.selection_overlap;
  in.selection_shares = q.selection_shares;
  in.score_on_gpu = q.score_on_gpu;
  return scheduler::simulate(in);
}

namespace {

std::string tier_line(const char* name, const scheduler::TierPlacement& t) {
  std::ostringstream os;
  os << "  " << name << std::string(6 - std::string_view(name).size(), ' ') << format_bytes(t.bytes) << " in "
     << t.blocks << " blocks";
  return os.str();
}

void text_decode(std::ostringstream& os, const PlanReport& r) {
  const scheduler::SelectionModel& s = r.selection;
  os << "decode (selection " << (s.measured ? "GIVEN" : "MODELED") << ": overlap " << num(s.overlap) << ", top-k " << s.topk_blocks
     << " blocks per KV head; selected blocks on gpu " << percent(s.gpu_share) << ", host " << percent(s.host_share)
     << ", nvme " << percent(s.nvme_share) << "):\n"
     << "  attention + tiering  " << num(r.decode_tokens_per_s_attention, "%.1f") << " tokens/s (step "
     << num(r.step_us_attention / 1e3, "%.2f") << " ms)\n"
     << "  full model           " << num(r.decode_tokens_per_s_full_model, "%.1f") << " tokens/s (step "
     << num(r.step_us_full_model / 1e3, "%.2f") << " ms; weights read once per step)\n"
     << "  bottleneck           " << r.bottleneck.lane << ", " << percent(r.bottleneck.utilisation)
     << " busy (full model: " << r.bottleneck_full_model.lane << ", "
     << percent(r.bottleneck_full_model.utilisation) << ")\n  lanes               ";
  for (const scheduler::LaneUse& l : r.lanes)
    os << " " << l.lane << " " << num(l.busy_us / 1e3, "%.2f") << " ms (" << percent(l.utilisation) << ")";
  const scheduler::Traffic& t = r.traffic;
  os << "\n  traffic per step     GPU HBM " << format_bytes(t.gpu_hbm_kv_bytes) << " KV + "
     << format_bytes(t.gpu_hbm_weights_bytes) << " weights; host RAM " << format_bytes(t.host_ram_bytes)
     << "; PCIe h2d " << format_bytes(t.pcie_h2d_bytes) << ", d2h " << format_bytes(t.pcie_d2h_bytes)
     << "; NVMe read " << format_bytes(t.nvme_read_bytes) << ", write " << format_bytes(t.nvme_write_bytes) << "\n";
}

}  // namespace

std::string plan_text(const PlanReport& r) {
  const scheduler::Capacity& c = r.cap;
  const scheduler::Placement& pl = c.placement;
  std::ostringstream os;
  os << "kvtier plan: " << r.model << ", " << format_tokens(r.context_tokens) << " tokens x batch " << r.batch
     << " on " << r.machine << "\n"
     << "policy: " << to_string(r.policy) << ", late blocks: " << scheduler::late_policy_name(r.late) << "\n"
     << "fits: " << (c.fits ? "yes" : "NO, the " + c.overflow_tier + " tier overflows: " + c.overflow_reason)
     << "\nlargest context that fits: " << r.max_context_tokens_that_fits << " tokens ("
     << num(static_cast<double>(r.max_context_tokens_that_fits) / (1 << 20), "%.1f") << "M)\n"
     << "memory: KV " << format_bytes(c.kv_bytes) << " (" << format_bytes(c.block_bytes) << " blocks), summaries "
     << format_bytes(c.summary_bytes) << " in host RAM, weights (bf16) " << format_bytes(r.weights_bytes) << " of "
     << format_bytes(r.gpu_memory_bytes) << " GPU memory; GPU budget for KV " << format_bytes(pl.gpu_budget_bytes)
     << ", host budget " << format_bytes(pl.host_budget_bytes) << "\nplacement:\n"
     << tier_line("gpu", pl.gpu) << " (hot set " << format_bytes(pl.gpu_hot_bytes) << ", cache "
     << pl.gpu_cache_blocks << " slots)\n"
     << tier_line("host", pl.host) << "\n"
     << tier_line("nvme", pl.nvme) << " (NVMe file " << format_bytes(pl.nvme_home_bytes) << " with the homes of "
     << "GPU-held blocks)\n";
  text_decode(os, r);
  os << "prefill: " << num(r.prefill_seconds, "%.1f") << " s for " << format_tokens(r.context_tokens)
     << " tokens of one sequence (bottleneck " << r.prefill_bottleneck.lane << ", "
     << percent(r.prefill_bottleneck.utilisation) << "); attention and tiering alone "
     << num(r.prefill_seconds_attention, "%.1f") << " s\n";
  for (const std::string& w : r.warnings) os << "warning: " << w << "\n";
  os << "assumptions (checked against measured runs on one H200 host and a build machine's CPU stand-in: "
        "docs/plan.md, Validation):\n";
  for (const std::string& a : r.assumptions) os << "  - " << a << "\n";
  return os.str();
}

Result<SweepSpec> parse_sweep(std::string_view text) {
  const std::string bad = "--sweep '" + std::string(text) + "'";
  if (text.substr(0, 8) != "context=")
    return invalid_argument(bad + " must be context=FROM:TO[:STEPS], e.g. context=128K:4M");
  const std::vector<std::string_view> parts = split(text.substr(8), ':');
  if (parts.size() < 2 || parts.size() > 3)
    return invalid_argument(bad + " must be context=FROM:TO[:STEPS], e.g. context=128K:4M");
  SweepSpec s;
  Result<uint64_t> from = parse_tokens(parts[0]);
  if (!from.ok()) return from.status().with_context(bad + " FROM");
  Result<uint64_t> to = parse_tokens(parts[1]);
  if (!to.ok()) return to.status().with_context(bad + " TO");
  s.from_tokens = *from;
  s.to_tokens = *to;
  if (s.from_tokens == 0 || s.to_tokens < s.from_tokens)
    return invalid_argument(bad + ": FROM must be > 0 and TO >= FROM");
  if (parts.size() == 3) {
    Result<uint32_t> steps = parse_u32("steps", parts[2]);
    if (!steps.ok() || *steps < 2 || *steps > 256) return invalid_argument(bad + ": STEPS must be in 2..256");
    s.steps = *steps;
  }
  return s;
}

std::vector<uint64_t> sweep_contexts(const SweepSpec& s, uint32_t chunk_tokens) {
  std::vector<uint64_t> out{s.from_tokens, s.to_tokens};
  if (s.steps == 0) {
    for (uint64_t p = 1; p <= s.to_tokens && p != 0; p <<= 1)
      if (p >= s.from_tokens) out.push_back(p);
  } else {
    const double ratio = static_cast<double>(s.to_tokens) / static_cast<double>(s.from_tokens);
    for (uint32_t i = 1; i + 1 < s.steps; ++i) {
      const double t = static_cast<double>(s.from_tokens) * std::pow(ratio, double(i) / (s.steps - 1));
      out.push_back(std::max<uint64_t>(chunk_tokens, std::llround(t / chunk_tokens) * uint64_t{chunk_tokens}));
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::string sweep_table(const std::vector<SweepSeries>& series) {
  std::ostringstream os;
  char line[256];
  std::snprintf(line, sizeof line, "%-34s %8s %5s %14s %12s %11s %-16s\n", "machine", "context", "fits",
                "attn tok/s", "full tok/s", "prefill s", "bottleneck");
  os << line;
  for (const SweepSeries& s : series)
    for (const PlanReport& r : s.points) {
      const std::string bottleneck = r.bottleneck.lane + " " + percent(r.bottleneck.utilisation);
      std::snprintf(line, sizeof line, "%-34s %8s %5s %14.1f %12.2f %11.1f %-16s\n", s.label.c_str(),
                    format_tokens(r.context_tokens).c_str(), r.cap.fits ? "yes" : "no",
                    r.decode_tokens_per_s_attention, r.decode_tokens_per_s_full_model, r.prefill_seconds,
                    bottleneck.c_str());
      os << line;
    }
  return os.str();
}

nlohmann::json sweep_json(const std::vector<SweepSeries>& series) {
  nlohmann::json lines = nlohmann::json::array();
  for (const SweepSeries& s : series) {
    nlohmann::json points = nlohmann::json::array();
    for (const PlanReport& r : s.points) points.push_back(scheduler::to_json(r));
    lines.push_back({{"label", s.label}, {"points", points}});
  }
  return {{"sweep", lines}};
}

namespace {

std::string xml_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '&') out += "&amp;";
    else if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

// Plot area and log scales of the sweep plot.
struct Frame {
  double left = 90, top = 50, width = 620, height = 400;
  double x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;  // log2 tokens, log10 tokens/s
  double x(uint64_t tokens) const {
    return left + (std::log2(static_cast<double>(tokens)) - x_lo) / (x_hi - x_lo) * width;
  }
  double y(double tokens_per_s) const { return top + height - (std::log10(tokens_per_s) - y_lo) / (y_hi - y_lo) * height; }
};

Frame frame_of(const std::vector<SweepSeries>& series) {
  Frame f;
  double x_min = 1e300, x_max = -1e300, y_min = 1e300, y_max = -1e300;
  for (const SweepSeries& s : series)
    for (const PlanReport& r : s.points) {
      x_min = std::min(x_min, std::log2(static_cast<double>(r.context_tokens)));
      x_max = std::max(x_max, std::log2(static_cast<double>(r.context_tokens)));
      if (!r.cap.fits) continue;
      for (double v : {r.decode_tokens_per_s_attention, r.decode_tokens_per_s_full_model})
        if (v > 0) y_min = std::min(y_min, std::log10(v)), y_max = std::max(y_max, std::log10(v));
    }
  if (x_min > x_max) x_min = 10, x_max = 20;
  if (x_max - x_min < 1) x_min -= 0.5, x_max += 0.5;
  if (y_min > y_max) y_min = 0, y_max = 3;
  f.x_lo = x_min, f.x_hi = x_max;
  f.y_lo = std::floor(y_min), f.y_hi = std::max(std::ceil(y_max), f.y_lo + 1);
  return f;
}

void svg_axes(std::ostringstream& os, const Frame& f, const std::vector<uint64_t>& contexts) {
  os << "<rect x=\"" << f.left << "\" y=\"" << f.top << "\" width=\"" << f.width << "\" height=\"" << f.height
     << "\" fill=\"none\" stroke=\"#444\"/>\n";
  for (int d = static_cast<int>(f.y_lo); d <= static_cast<int>(f.y_hi); ++d) {
    const double y = f.y(std::pow(10.0, d));
    os << "<line x1=\"" << f.left << "\" y1=\"" << y << "\" x2=\"" << f.left + f.width << "\" y2=\"" << y
       << "\" stroke=\"#ddd\"/>\n<text x=\"" << f.left - 8 << "\" y=\"" << y + 4
       << "\" text-anchor=\"end\">" << num(std::pow(10.0, d), "%g") << "</text>\n";
  }
  for (uint64_t c : contexts) {
    const double x = f.x(c);
    os << "<line x1=\"" << x << "\" y1=\"" << f.top << "\" x2=\"" << x << "\" y2=\"" << f.top + f.height
       << "\" stroke=\"#eee\"/>\n<text x=\"" << x << "\" y=\"" << f.top + f.height + 18
       << "\" text-anchor=\"middle\">" << format_tokens(c) << "</text>\n";
  }
  os << "<text x=\"" << f.left + f.width / 2 << "\" y=\"" << f.top + f.height + 42
     << "\" text-anchor=\"middle\">context length (tokens, log scale)</text>\n"
     << "<text transform=\"translate(24," << f.top + f.height / 2
     << ") rotate(-90)\" text-anchor=\"middle\">decode tokens/s (all sequences of the batch, log scale)</text>\n";
}

void svg_series(std::ostringstream& os, const Frame& f, const SweepSeries& s, const char* colour, size_t index) {
  std::string full, attention;
  for (const PlanReport& r : s.points) {
    const double x = f.x(r.context_tokens);
    if (!r.cap.fits) {  // omitted from the lines; a cross on the x axis
      const double y = f.top + f.height;
      os << "<path d=\"M" << x - 5 << " " << y - 5 << " L" << x + 5 << " " << y + 5 << " M" << x - 5 << " " << y + 5
         << " L" << x + 5 << " " << y - 5 << "\" stroke=\"" << colour << "\" stroke-width=\"2\"/>\n";
      continue;
    }
    full += num(x, "%.1f") + "," + num(f.y(r.decode_tokens_per_s_full_model), "%.1f") + " ";
    attention += num(x, "%.1f") + "," + num(f.y(r.decode_tokens_per_s_attention), "%.1f") + " ";
  }
  if (!full.empty())
    os << "<polyline class=\"full-model\" fill=\"none\" stroke=\"" << colour << "\" stroke-width=\"2.5\" points=\""
       << full << "\"/>\n<polyline class=\"attention-tiering\" fill=\"none\" stroke=\"" << colour
       << "\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\" points=\"" << attention << "\"/>\n";
  const double ly = f.top + 10 + 22.0 * static_cast<double>(index);
  const double lx = f.left + f.width + 20;
  os << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 24 << "\" y2=\"" << ly << "\" stroke=\""
     << colour << "\" stroke-width=\"2.5\"/>\n<text x=\"" << lx + 30 << "\" y=\"" << ly + 4 << "\">"
     << xml_escape(s.label) << (full.empty() ? " (fits nowhere)" : "") << "</text>\n";
}

}  // namespace

std::string sweep_svg(const std::vector<SweepSeries>& series) {
  static constexpr const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                             "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
  const Frame f = frame_of(series);
  std::vector<uint64_t> contexts;
  for (const SweepSeries& s : series)
    for (const PlanReport& r : s.points) contexts.push_back(r.context_tokens);
  std::sort(contexts.begin(), contexts.end());
  contexts.erase(std::unique(contexts.begin(), contexts.end()), contexts.end());
  const std::string model = series.empty() || series[0].points.empty() ? "" : series[0].points[0].model;
  const uint32_t batch = series.empty() || series[0].points.empty() ? 1 : series[0].points[0].batch;
  std::ostringstream os;
  const double legend_width = 330;
  os << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << f.left + f.width + legend_width << "\" height=\""
     << f.top + f.height + 110 << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
     << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
     << "<text x=\"" << f.left << "\" y=\"28\" font-size=\"15\">kvtier plan: " << xml_escape(model) << ", batch "
     << batch << ", decode tokens/s against context (modeled; checked on one H200 host, docs/plan.md)</text>\n";
  svg_axes(os, f, contexts);
  for (size_t i = 0; i < series.size(); ++i) svg_series(os, f, series[i], kColours[i % 8], i);
  const double ny = f.top + f.height + 70;
  os << "<text x=\"" << f.left << "\" y=\"" << ny
     << "\">solid: full model (weights read per token); dashed: attention + tiering only; "
        "x on the axis: does not fit (left out of the lines)</text>\n</svg>\n";
  return os.str();
}

}  // namespace kvtier::runtime
