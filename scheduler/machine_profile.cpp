#include "kvtier/scheduler/machine_profile.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iomanip>
#include <limits>
#include <optional>
#include <span>
#include <sstream>
#include <type_traits>

#include "machine_presets.h"

namespace kvtier::scheduler {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// ---- interpolation --------------------------------------------------------

// Where x falls among n increasing positive values: the neighbours and the
// fraction between them in log space; clamped to the first/last value.
struct Bracket {
  size_t lo = 0, hi = 0;
  double t = 0;
};

template <class Value>
Bracket bracket(size_t n, Value value, double x) {
  if (x <= value(0)) return {0, 0, 0.0};
  if (x >= value(n - 1)) return {n - 1, n - 1, 0.0};
  size_t hi = 1;
  while (value(hi) < x) ++hi;  // tables hold a handful of points
  const double lo_log = std::log(value(hi - 1));
  return {hi - 1, hi, (std::log(x) - lo_log) / (std::log(value(hi)) - lo_log)};
}

double lerp(double a, double b, double t) { return a + (b - a) * t; }

// ---- validation -----------------------------------------------------------

std::string format_number(double v) {
  std::ostringstream os;
  os << std::setprecision(12) << v;
  return os.str();
}

std::string index_path(std::string_view path, size_t i) {
  return std::string(path) + "[" + std::to_string(i) + "]";
}

Status field_error(std::string_view path, std::string_view value, std::string_view rule) {
  return invalid_argument("machine profile " + std::string(path) + " = " + std::string(value) + ": " +
                          std::string(rule));
}

Status check_rate(std::string_view path, double v) {
  if (!std::isfinite(v)) return field_error(path, format_number(v), "must be a finite number");
  if (!(v > 0)) return field_error(path, format_number(v), "must be > 0");
  return Status::ok_status();
}

Status check_time(std::string_view path, double v) {
  if (!std::isfinite(v)) return field_error(path, format_number(v), "must be a finite number");
  if (v < 0) return field_error(path, format_number(v), "must be >= 0");
  return Status::ok_status();
}

Status check_count(std::string_view path, uint64_t v) {
  if (v == 0) return field_error(path, "0", "must be > 0");
  return Status::ok_status();
}

Status check_name(std::string_view part, const std::string& name) {
  if (name.empty())
    return invalid_argument("machine profile " + std::string(part) + ".name is empty: every part needs a name");
  return Status::ok_status();
}

Status validate_curve(std::string_view path, const BandwidthCurve& c) {
  if (c.points.empty())
    return invalid_argument("machine profile " + std::string(path) +
                            " is empty: it needs at least one {bytes, gbps} point");
  for (size_t i = 0; i < c.points.size(); ++i) {
    const std::string p = index_path(path, i);
    KVT_RETURN_IF_ERROR(check_count(p + ".bytes", c.points[i].bytes));
    KVT_RETURN_IF_ERROR(check_rate(p + ".gbps", c.points[i].gbps));
    if (i > 0 && c.points[i].bytes <= c.points[i - 1].bytes)
      return field_error(p + ".bytes", std::to_string(c.points[i].bytes),
                         "must be greater than the previous point's " + std::to_string(c.points[i - 1].bytes) +
                             " (points sorted by size, no size twice)");
  }
  return Status::ok_status();
}

bool grid_less(const NvmePoint& a, const NvmePoint& b) {
  return a.request_bytes != b.request_bytes ? a.request_bytes < b.request_bytes : a.queue_depth < b.queue_depth;
}

// With the points sorted and distinct, the table is a full grid exactly when
// it has (distinct sizes) x (distinct depths) points; otherwise name a hole.
Status check_full_grid(std::string_view path, const std::vector<NvmePoint>& points) {
  std::vector<uint64_t> sizes;
  std::vector<uint32_t> depths;
  for (const NvmePoint& p : points) {
    if (sizes.empty() || sizes.back() != p.request_bytes) sizes.push_back(p.request_bytes);
    depths.push_back(p.queue_depth);
  }
  std::sort(depths.begin(), depths.end());
  depths.erase(std::unique(depths.begin(), depths.end()), depths.end());
  if (points.size() == sizes.size() * depths.size()) return Status::ok_status();
  for (uint64_t s : sizes)
    for (uint32_t d : depths)
      if (!std::binary_search(points.begin(), points.end(), NvmePoint{s, d, 0}, grid_less))
        return invalid_argument("machine profile " + std::string(path) +
                                " is not a full grid: no point for request_bytes=" + std::to_string(s) +
                                " at queue_depth=" + std::to_string(d) +
                                " (every request size needs every queue depth)");
  return internal_error("machine profile " + std::string(path) + ": grid check found no hole");  // unreachable
}

Status validate_grid(std::string_view path, const NvmeCurve& c) {
  if (c.points.empty())
    return invalid_argument("machine profile " + std::string(path) +
                            " is empty: it needs {request_bytes, queue_depth, gbps} points");
  for (size_t i = 0; i < c.points.size(); ++i) {
    const NvmePoint& pt = c.points[i];
    const std::string p = index_path(path, i);
    KVT_RETURN_IF_ERROR(check_count(p + ".request_bytes", pt.request_bytes));
    KVT_RETURN_IF_ERROR(check_count(p + ".queue_depth", pt.queue_depth));
    KVT_RETURN_IF_ERROR(check_rate(p + ".gbps", pt.gbps));
    if (i > 0 && !grid_less(c.points[i - 1], pt))
      return invalid_argument("machine profile " + p + " (request_bytes=" + std::to_string(pt.request_bytes) +
                              ", queue_depth=" + std::to_string(pt.queue_depth) +
                              "): points must be sorted by (request_bytes, queue_depth), each pair once");
  }
  return check_full_grid(path, c.points);
}

// ---- reading JSON ---------------------------------------------------------

// A JSON value for an error message, cut short if it is long.
std::string shown(const json& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

Result<uint64_t> read_u64(const json& v, const std::string& path) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) return field_error(path, shown(v), "must be > 0");
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (d < 0) return field_error(path, shown(v), "must be > 0");
    if (d == std::floor(d) && d < 1.8e19) return static_cast<uint64_t>(d);
  }
  return field_error(path, shown(v), "must be a whole number");
}

Result<uint32_t> read_u32(const json& v, const std::string& path) {
  KVT_ASSIGN_OR_RETURN(const uint64_t x, read_u64(v, path));
  if (x > std::numeric_limits<uint32_t>::max()) return field_error(path, shown(v), "must be < 2^32");
  return static_cast<uint32_t>(x);
}

Result<double> read_number(const json& v, const std::string& path) {
  if (!v.is_number()) return field_error(path, shown(v), "must be a number");
  return v.get<double>();
}

// The fields of one JSON object; errors name each field by its path ("gpu.sm_count").
class Fields {
 public:
  static Result<Fields> open(const json& j, std::string path) {
    if (!j.is_object()) return field_error(path, shown(j), "must be a JSON object");
    return Fields(j, std::move(path));
  }

  std::string path(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }

  Result<const json*> get(std::string_view key) const {
    const auto it = j_->find(key);
    if (it == j_->end()) return invalid_argument("machine profile " + path(key) + " is missing");
    return &*it;
  }
  Result<std::string> string(std::string_view key) const {
    KVT_ASSIGN_OR_RETURN(const json* v, get(key));
    if (!v->is_string()) return field_error(path(key), shown(*v), "must be a string");
    return v->get<std::string>();
  }
  Result<uint64_t> u64(std::string_view key) const {
    KVT_ASSIGN_OR_RETURN(const json* v, get(key));
    return read_u64(*v, path(key));
  }
  Result<uint32_t> u32(std::string_view key) const {
    KVT_ASSIGN_OR_RETURN(const json* v, get(key));
    return read_u32(*v, path(key));
  }
  Result<double> number(std::string_view key) const {
    KVT_ASSIGN_OR_RETURN(const json* v, get(key));
    return read_number(*v, path(key));
  }
  Result<const json*> array(std::string_view key) const {
    KVT_ASSIGN_OR_RETURN(const json* v, get(key));
    if (!v->is_array()) return field_error(path(key), shown(*v), "must be an array");
    return v;
  }

  // Rejects keys outside `known`, so that a misspelt field is never ignored.
  Status only(std::initializer_list<std::string_view> known) const {
    for (const auto& [key, value] : j_->items()) {
      if (std::find(known.begin(), known.end(), key) != known.end()) continue;
      std::string list;
      for (std::string_view k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      const std::string where = path_.empty() ? "at the top level" : "in " + path_;
      return invalid_argument("machine profile has an unknown key '" + key + "' " + where + " (known: " + list + ")");
    }
    return Status::ok_status();
  }

 private:
  Fields(const json& j, std::string path) : j_(&j), path_(std::move(path)) {}
  const json* j_;
  std::string path_;
};

// Points are checked where the file has them, so that an error's index is the
// file's; then sorted, and a repeated size is reported without an index.
Result<BandwidthCurve> read_curve(const Fields& f, std::string_view key) {
  KVT_ASSIGN_OR_RETURN(const json* arr, f.array(key));
  BandwidthCurve c;
  for (size_t i = 0; i < arr->size(); ++i) {
    KVT_ASSIGN_OR_RETURN(const Fields p, Fields::open((*arr)[i], index_path(f.path(key), i)));
    KVT_RETURN_IF_ERROR(p.only({"bytes", "gbps"}));
    BandwidthPoint pt;
    KVT_ASSIGN_OR_RETURN(pt.bytes, p.u64("bytes"));
    KVT_ASSIGN_OR_RETURN(pt.gbps, p.number("gbps"));
    KVT_RETURN_IF_ERROR(check_count(p.path("bytes"), pt.bytes));
    KVT_RETURN_IF_ERROR(check_rate(p.path("gbps"), pt.gbps));
    c.points.push_back(pt);
  }
  std::sort(c.points.begin(), c.points.end(),
            [](const BandwidthPoint& a, const BandwidthPoint& b) { return a.bytes < b.bytes; });
  for (size_t i = 1; i < c.points.size(); ++i)
    if (c.points[i].bytes == c.points[i - 1].bytes)
      return invalid_argument("machine profile " + f.path(key) + " has two points at bytes=" +
                              std::to_string(c.points[i].bytes));
  return c;
}

Result<NvmeCurve> read_grid(const Fields& f, std::string_view key) {
  KVT_ASSIGN_OR_RETURN(const json* arr, f.array(key));
  NvmeCurve c;
  for (size_t i = 0; i < arr->size(); ++i) {
    KVT_ASSIGN_OR_RETURN(const Fields p, Fields::open((*arr)[i], index_path(f.path(key), i)));
    KVT_RETURN_IF_ERROR(p.only({"request_bytes", "queue_depth", "gbps"}));
    NvmePoint pt;
    KVT_ASSIGN_OR_RETURN(pt.request_bytes, p.u64("request_bytes"));
    KVT_ASSIGN_OR_RETURN(pt.queue_depth, p.u32("queue_depth"));
    KVT_ASSIGN_OR_RETURN(pt.gbps, p.number("gbps"));
    KVT_RETURN_IF_ERROR(check_count(p.path("request_bytes"), pt.request_bytes));
    KVT_RETURN_IF_ERROR(check_count(p.path("queue_depth"), pt.queue_depth));
    KVT_RETURN_IF_ERROR(check_rate(p.path("gbps"), pt.gbps));
    c.points.push_back(pt);
  }
  std::sort(c.points.begin(), c.points.end(), grid_less);
  for (size_t i = 1; i < c.points.size(); ++i)
    if (!grid_less(c.points[i - 1], c.points[i]))
      return invalid_argument("machine profile " + f.path(key) + " has two points at request_bytes=" +
                              std::to_string(c.points[i].request_bytes) +
                              ", queue_depth=" + std::to_string(c.points[i].queue_depth));
  return c;
}

Result<GpuProfile> read_gpu(const json& j) {
  KVT_ASSIGN_OR_RETURN(const Fields f, Fields::open(j, "gpu"));
  KVT_RETURN_IF_ERROR(
      f.only({"name", "source", "memory_bytes", "hbm_read_gbps", "bf16_tflops", "sm_count", "cpu_standin"}));
  GpuProfile g;
  KVT_ASSIGN_OR_RETURN(g.name, f.string("name"));
  KVT_ASSIGN_OR_RETURN(g.source, f.string("source"));
  KVT_ASSIGN_OR_RETURN(g.memory_bytes, f.u64("memory_bytes"));
  KVT_ASSIGN_OR_RETURN(g.hbm_read_gbps, f.number("hbm_read_gbps"));
  KVT_ASSIGN_OR_RETURN(g.bf16_tflops, f.number("bf16_tflops"));
  KVT_ASSIGN_OR_RETURN(g.sm_count, f.u32("sm_count"));
  if (j.contains("cpu_standin")) {  // optional: false when absent
    const json& v = j["cpu_standin"];
    if (!v.is_boolean()) return field_error("gpu.cpu_standin", shown(v), "must be true or false");
    g.cpu_standin = v.get<bool>();
  }
  KVT_RETURN_IF_ERROR(validate(g));
  return g;
}

Result<LinkProfile> read_link(const json& j) {
  KVT_ASSIGN_OR_RETURN(const Fields f, Fields::open(j, "link"));
  KVT_RETURN_IF_ERROR(f.only({"name", "source", "h2d", "d2h", "duplex_factor"}));
  LinkProfile l;
  KVT_ASSIGN_OR_RETURN(l.name, f.string("name"));
  KVT_ASSIGN_OR_RETURN(l.source, f.string("source"));
  KVT_ASSIGN_OR_RETURN(l.h2d, read_curve(f, "h2d"));
  KVT_ASSIGN_OR_RETURN(l.d2h, read_curve(f, "d2h"));
  KVT_ASSIGN_OR_RETURN(l.duplex_factor, f.number("duplex_factor"));
  KVT_RETURN_IF_ERROR(validate(l));
  return l;
}

Result<HostProfile> read_host(const json& j) {
  KVT_ASSIGN_OR_RETURN(const Fields f, Fields::open(j, "host"));
  KVT_RETURN_IF_ERROR(f.only({"name", "source", "memory_bytes", "read_gbps", "cores", "score_gbps", "attend_gbps",
                              "topk_gbps", "prepare_us_per_list", "plan_us_per_block", "step_overhead_us", "attend_call_us",
                              "prefill_stage_gbps", "prefill_query_gbps"}));
  HostProfile h;
  KVT_ASSIGN_OR_RETURN(h.name, f.string("name"));
  KVT_ASSIGN_OR_RETURN(h.source, f.string("source"));
  KVT_ASSIGN_OR_RETURN(h.memory_bytes, f.u64("memory_bytes"));
  KVT_ASSIGN_OR_RETURN(h.read_gbps, f.number("read_gbps"));
  KVT_ASSIGN_OR_RETURN(h.cores, f.u32("cores"));
  KVT_ASSIGN_OR_RETURN(h.score_gbps, f.number("score_gbps"));
  KVT_ASSIGN_OR_RETURN(h.attend_gbps, f.number("attend_gbps"));
  // Profiles written before these were measured lack them: say how to get them.
  for (const char* key : {"prepare_us_per_list", "plan_us_per_block", "step_overhead_us", "attend_call_us",
                          "prefill_stage_gbps", "prefill_query_gbps"})
    if (!j.contains(key))
      return invalid_argument("machine profile " + f.path(key) +
                              " is missing (the executor's host time, added to profiles on 2026-11-28): run "
                              "kvtier calibrate again, or copy host.prepare_us_per_list, plan_us_per_block, "
                              "step_overhead_us, attend_call_us, prefill_stage_gbps and prefill_query_gbps from a "
                              "host preset (kvtier plan --machine ddr5-128g,... uses them)");
  if (!j.contains("topk_gbps"))
    return invalid_argument("machine profile " + f.path("topk_gbps") +
                            " is missing (the rate of decode's top-k over the block scores, added to profiles on "
                            "2026-11-28; before, top-k was priced at score_gbps): run kvtier calibrate again, or "
                            "copy host.topk_gbps from a host preset (kvtier plan --machine ddr5-128g,... uses it)");
  KVT_ASSIGN_OR_RETURN(h.topk_gbps, f.number("topk_gbps"));
  KVT_ASSIGN_OR_RETURN(h.prepare_us_per_list, f.number("prepare_us_per_list"));
  KVT_ASSIGN_OR_RETURN(h.plan_us_per_block, f.number("plan_us_per_block"));
  KVT_ASSIGN_OR_RETURN(h.step_overhead_us, f.number("step_overhead_us"));
  KVT_ASSIGN_OR_RETURN(h.attend_call_us, f.number("attend_call_us"));
  KVT_ASSIGN_OR_RETURN(h.prefill_stage_gbps, f.number("prefill_stage_gbps"));
  KVT_ASSIGN_OR_RETURN(h.prefill_query_gbps, f.number("prefill_query_gbps"));
  KVT_RETURN_IF_ERROR(validate(h));
  return h;
}

Result<NvmeProfile> read_nvme(const json& j) {
  KVT_ASSIGN_OR_RETURN(const Fields f, Fields::open(j, "nvme"));
  KVT_RETURN_IF_ERROR(f.only({"name", "source", "capacity_bytes", "latency_us", "read", "write"}));
  NvmeProfile n;
  KVT_ASSIGN_OR_RETURN(n.name, f.string("name"));
  KVT_ASSIGN_OR_RETURN(n.source, f.string("source"));
  KVT_ASSIGN_OR_RETURN(n.capacity_bytes, f.u64("capacity_bytes"));
  KVT_ASSIGN_OR_RETURN(n.latency_us, f.number("latency_us"));
  KVT_ASSIGN_OR_RETURN(n.read, read_grid(f, "read"));
  KVT_ASSIGN_OR_RETURN(n.write, read_grid(f, "write"));
  KVT_RETURN_IF_ERROR(validate(n));
  return n;
}

// Some or all parts of a machine, as a file or a preset gives them.
struct Parts {
  std::optional<std::string> name;
  std::optional<GpuProfile> gpu;
  std::optional<LinkProfile> link;
  std::optional<HostProfile> host;
  std::optional<NvmeProfile> nvme;
  bool link_from_gpu_preset = false;  // a GPU preset's usual link, which an explicit link replaces
};

Result<Parts> read_parts(const json& j) {
  if (!j.is_object())
    return invalid_argument("machine profile: the top level must be a JSON object with any of the keys gpu, link, "
                            "host, nvme (got " + shown(j) + ")");
  KVT_ASSIGN_OR_RETURN(const Fields f, Fields::open(j, ""));
  KVT_RETURN_IF_ERROR(f.only({"name", "gpu", "link", "host", "nvme"}));
  Parts parts;
  // KVT_ASSIGN_OR_RETURN is several statements: each needs its braces.
  if (j.contains("name")) {
    KVT_ASSIGN_OR_RETURN(parts.name, f.string("name"));
  }
  if (j.contains("gpu")) {
    KVT_ASSIGN_OR_RETURN(parts.gpu, read_gpu(j["gpu"]));
  }
  if (j.contains("link")) {
    KVT_ASSIGN_OR_RETURN(parts.link, read_link(j["link"]));
  }
  if (j.contains("host")) {
    KVT_ASSIGN_OR_RETURN(parts.host, read_host(j["host"]));
  }
  if (j.contains("nvme")) {
    KVT_ASSIGN_OR_RETURN(parts.nvme, read_nvme(j["nvme"]));
  }
  if (!parts.gpu && !parts.link && !parts.host && !parts.nvme)
    return invalid_argument("machine profile has none of the parts gpu, link, host, nvme");
  return parts;
}

Result<json> read_json_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return not_found("machine profile file '" + path.string() + "': " + std::strerror(errno));
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    return invalid_argument("machine profile file '" + path.string() + "' is not valid JSON: " + e.what());
  }
}

// ---- presets and composition ----------------------------------------------

template <class T>
std::vector<std::string> names_of(std::span<const T> table) {
  std::vector<std::string> out;
  for (const T& t : table) {
    if constexpr (std::is_same_v<T, detail::GpuPreset>) out.push_back(t.gpu.name);
    else out.push_back(t.name);
  }
  return out;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

std::string all_preset_names() {
  std::string out;
  for (MachinePart part : {MachinePart::kGpu, MachinePart::kHost, MachinePart::kNvme, MachinePart::kLink})
    out += (out.empty() ? "" : "; ") + std::string(machine_part_name(part)) + ": " + joined(preset_names(part));
  return out;
}

std::optional<Parts> find_preset(std::string_view name) {
  Parts parts;
  for (const detail::GpuPreset& g : detail::gpu_presets()) {
    if (g.gpu.name != name) continue;
    parts.gpu = g.gpu;
    for (const LinkProfile& l : detail::link_presets())
      if (l.name == g.link) parts.link = l;
    KVT_ASSERT(parts.link.has_value(), "GPU preset ", g.gpu.name, " names an unknown link preset ", g.link);
    parts.link_from_gpu_preset = true;
    return parts;
  }
  for (const LinkProfile& l : detail::link_presets())
    if (l.name == name) parts.link = l;
  for (const HostProfile& h : detail::host_presets())
    if (h.name == name) parts.host = h;
  for (const NvmeProfile& n : detail::nvme_presets())
    if (n.name == name) parts.nvme = n;
  if (!parts.link && !parts.host && !parts.nvme) return std::nullopt;
  return parts;
}

Result<Parts> resolve(std::string_view token) {
  if (std::optional<Parts> preset = find_preset(token)) return std::move(*preset);
  std::error_code ec;
  if (!fs::is_regular_file(fs::path(token), ec))
    return not_found("machine part '" + std::string(token) + "' is neither a preset nor a file; presets are " +
                     all_preset_names());
  KVT_ASSIGN_OR_RETURN(const json j, read_json_file(fs::path(token)));
  Result<Parts> parts = read_parts(j);
  if (!parts.ok()) return parts.status().with_context(token);
  return parts;
}

// Moves one part into the machine being composed; each part may come once.
template <class T>
Status take(std::optional<T>& slot, std::string& slot_from, std::optional<T>& part, std::string_view token,
            MachinePart which) {
  if (!part) return Status::ok_status();
  if (slot)
    return invalid_argument("two " + std::string(machine_part_name(which)) + " parts, from '" + slot_from +
                            "' and from '" + std::string(token) + "': give exactly one");
  slot = std::move(part);
  slot_from = token;
  return Status::ok_status();
}

struct Composition {
  Parts parts;
  std::string gpu_from, link_from, host_from, nvme_from;
};

Status add(Composition& c, Parts from, std::string_view token) {
  if (from.name) c.parts.name = from.name;
  KVT_RETURN_IF_ERROR(take(c.parts.gpu, c.gpu_from, from.gpu, token, MachinePart::kGpu));
  KVT_RETURN_IF_ERROR(take(c.parts.host, c.host_from, from.host, token, MachinePart::kHost));
  KVT_RETURN_IF_ERROR(take(c.parts.nvme, c.nvme_from, from.nvme, token, MachinePart::kNvme));
  if (!from.link) return Status::ok_status();
  // An explicit link (a link preset or a file) replaces the one a GPU preset brought.
  if (c.parts.link && !c.parts.link_from_gpu_preset && from.link_from_gpu_preset) return Status::ok_status();
  if (c.parts.link && c.parts.link_from_gpu_preset && !from.link_from_gpu_preset) c.parts.link.reset();
  KVT_RETURN_IF_ERROR(take(c.parts.link, c.link_from, from.link, token, MachinePart::kLink));
  c.parts.link_from_gpu_preset = from.link_from_gpu_preset;
  return Status::ok_status();
}

Status require_part(bool present, MachinePart part) {
  if (present) return Status::ok_status();
  const std::string name(machine_part_name(part));
  return invalid_argument("no " + name + " part: add one of the " + name + " presets (" + joined(preset_names(part)) +
                          ") or a JSON file holding \"" + name + "\"");
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split_spec(std::string_view spec) {
  std::vector<std::string_view> tokens;
  size_t start = 0;
  while (true) {
    const size_t comma = spec.find(',', start);
    const size_t length = comma == std::string_view::npos ? std::string_view::npos : comma - start;
    tokens.push_back(trim(spec.substr(start, length)));
    if (comma == std::string_view::npos) return tokens;
    start = comma + 1;
  }
}

Result<MachineProfile> compose_tokens(const std::vector<std::string_view>& tokens) {
  Composition c;
  for (std::string_view token : tokens) {
    if (token.empty()) return invalid_argument("an empty part (two commas in a row, or a trailing comma)");
    KVT_ASSIGN_OR_RETURN(Parts parts, resolve(token));
    KVT_RETURN_IF_ERROR(add(c, std::move(parts), token));
  }
  KVT_RETURN_IF_ERROR(require_part(c.parts.gpu.has_value(), MachinePart::kGpu));
  KVT_RETURN_IF_ERROR(require_part(c.parts.link.has_value(), MachinePart::kLink));
  KVT_RETURN_IF_ERROR(require_part(c.parts.host.has_value(), MachinePart::kHost));
  KVT_RETURN_IF_ERROR(require_part(c.parts.nvme.has_value(), MachinePart::kNvme));
  MachineProfile m;
  std::string spec;
  for (std::string_view t : tokens) spec += (spec.empty() ? "" : ",") + std::string(t);
  m.name = tokens.size() == 1 && c.parts.name ? *c.parts.name : spec;
  m.gpu = std::move(*c.parts.gpu);
  m.link = std::move(*c.parts.link);
  m.host = std::move(*c.parts.host);
  m.nvme = std::move(*c.parts.nvme);
  KVT_RETURN_IF_ERROR(validate(m));
  return m;
}

// ---- writing JSON ---------------------------------------------------------

json curve_json(const BandwidthCurve& c) {
  json out = json::array();
  for (const BandwidthPoint& p : c.points) out.push_back({{"bytes", p.bytes}, {"gbps", p.gbps}});
  return out;
}

json grid_json(const NvmeCurve& c) {
  json out = json::array();
  for (const NvmePoint& p : c.points)
    out.push_back({{"request_bytes", p.request_bytes}, {"queue_depth", p.queue_depth}, {"gbps", p.gbps}});
  return out;
}

}  // namespace

std::string_view machine_part_name(MachinePart part) {
  switch (part) {
    case MachinePart::kGpu: return "gpu";
    case MachinePart::kLink: return "link";
    case MachinePart::kHost: return "host";
    case MachinePart::kNvme: return "nvme";
  }
  return "?";
}

double BandwidthCurve::gbps_at(uint64_t bytes) const {
  KVT_ASSERT(!points.empty(), "gbps_at on an empty bandwidth curve (validate() rejects these)");
  const Bracket b = bracket(points.size(), [&](size_t i) { return static_cast<double>(points[i].bytes); },
                            static_cast<double>(bytes));
  return lerp(points[b.lo].gbps, points[b.hi].gbps, b.t);
}

double LinkProfile::gbps_at(LinkDirection dir, uint64_t bytes, bool both_directions) const {
  const double one_way = (dir == LinkDirection::kHostToDevice ? h2d : d2h).gbps_at(bytes);
  return both_directions ? one_way * duplex_factor : one_way;
}

double NvmeCurve::gbps_at(uint64_t request_bytes, uint32_t queue_depth) const {
  KVT_ASSERT(!points.empty(), "gbps_at on an empty NVMe table (validate() rejects these)");
  // Sorted full grid: depths vary fastest, so the first row's length is the depth count.
  size_t depths = 1;
  while (depths < points.size() && points[depths].request_bytes == points[0].request_bytes) ++depths;
  KVT_ASSERT(points.size() % depths == 0, "NVMe table is not a full grid: ", points.size(), " points, ", depths,
             " depths");
  const size_t sizes = points.size() / depths;
  const Bracket s = bracket(sizes, [&](size_t i) { return static_cast<double>(points[i * depths].request_bytes); },
                            static_cast<double>(request_bytes));
  const Bracket d = bracket(depths, [&](size_t j) { return static_cast<double>(points[j].queue_depth); },
                            static_cast<double>(queue_depth));
  const auto at = [&](size_t i, size_t j) { return points[i * depths + j].gbps; };
  return lerp(lerp(at(s.lo, d.lo), at(s.lo, d.hi), d.t), lerp(at(s.hi, d.lo), at(s.hi, d.hi), d.t), s.t);
}

Status validate(const GpuProfile& g) {
  KVT_RETURN_IF_ERROR(check_name("gpu", g.name));
  KVT_RETURN_IF_ERROR(check_count("gpu.memory_bytes", g.memory_bytes));
  KVT_RETURN_IF_ERROR(check_rate("gpu.hbm_read_gbps", g.hbm_read_gbps));
  KVT_RETURN_IF_ERROR(check_rate("gpu.bf16_tflops", g.bf16_tflops));
  return check_count("gpu.sm_count", g.sm_count);
}

Status validate(const LinkProfile& l) {
  KVT_RETURN_IF_ERROR(check_name("link", l.name));
  KVT_RETURN_IF_ERROR(validate_curve("link.h2d", l.h2d));
  KVT_RETURN_IF_ERROR(validate_curve("link.d2h", l.d2h));
  KVT_RETURN_IF_ERROR(check_rate("link.duplex_factor", l.duplex_factor));
  if (l.duplex_factor > 1)
    return field_error("link.duplex_factor", format_number(l.duplex_factor),
                       "must be <= 1 (a direction never gets faster because the other one is busy)");
  return Status::ok_status();
}

Status validate(const HostProfile& h) {
  KVT_RETURN_IF_ERROR(check_name("host", h.name));
  KVT_RETURN_IF_ERROR(check_count("host.memory_bytes", h.memory_bytes));
  KVT_RETURN_IF_ERROR(check_rate("host.read_gbps", h.read_gbps));
  KVT_RETURN_IF_ERROR(check_count("host.cores", h.cores));
  KVT_RETURN_IF_ERROR(check_rate("host.score_gbps", h.score_gbps));
  KVT_RETURN_IF_ERROR(check_rate("host.attend_gbps", h.attend_gbps));
  KVT_RETURN_IF_ERROR(check_rate("host.topk_gbps", h.topk_gbps));
  KVT_RETURN_IF_ERROR(check_time("host.prepare_us_per_list", h.prepare_us_per_list));
  KVT_RETURN_IF_ERROR(check_time("host.plan_us_per_block", h.plan_us_per_block));
  KVT_RETURN_IF_ERROR(check_time("host.step_overhead_us", h.step_overhead_us));
  KVT_RETURN_IF_ERROR(check_time("host.attend_call_us", h.attend_call_us));
  KVT_RETURN_IF_ERROR(check_rate("host.prefill_stage_gbps", h.prefill_stage_gbps));
  return check_rate("host.prefill_query_gbps", h.prefill_query_gbps);
}

Status validate(const NvmeProfile& n) {
  KVT_RETURN_IF_ERROR(check_name("nvme", n.name));
  KVT_RETURN_IF_ERROR(check_count("nvme.capacity_bytes", n.capacity_bytes));
  KVT_RETURN_IF_ERROR(check_rate("nvme.latency_us", n.latency_us));
  KVT_RETURN_IF_ERROR(validate_grid("nvme.read", n.read));
  return validate_grid("nvme.write", n.write);
}

Status validate(const MachineProfile& m) {
  KVT_RETURN_IF_ERROR(validate(m.gpu));
  KVT_RETURN_IF_ERROR(validate(m.link));
  KVT_RETURN_IF_ERROR(validate(m.host));
  return validate(m.nvme);
}

Result<MachineProfile> parse_machine_profile_json(const json& j, std::string_view origin) {
  const auto in_origin = [&](const Status& s) { return origin.empty() ? s : s.with_context(origin); };
  Result<Parts> read = read_parts(j);
  if (!read.ok()) return in_origin(read.status());
  Parts& parts = read.value();
  for (MachinePart part : {MachinePart::kGpu, MachinePart::kLink, MachinePart::kHost, MachinePart::kNvme}) {
    const bool present = part == MachinePart::kGpu    ? parts.gpu.has_value()
                         : part == MachinePart::kLink ? parts.link.has_value()
                         : part == MachinePart::kHost ? parts.host.has_value()
                                                      : parts.nvme.has_value();
    if (!present)
      return in_origin(invalid_argument("machine profile " + std::string(machine_part_name(part)) +
                                        " is missing (a whole machine needs gpu, link, host and nvme)"));
  }
  return MachineProfile{parts.name.value_or(std::string(origin)), std::move(*parts.gpu), std::move(*parts.link),
                        std::move(*parts.host), std::move(*parts.nvme)};
}

json to_json(const GpuProfile& g) {
  return {{"name", g.name},
          {"source", g.source},
          {"memory_bytes", g.memory_bytes},
          {"hbm_read_gbps", g.hbm_read_gbps},
          {"bf16_tflops", g.bf16_tflops},
          {"sm_count", g.sm_count},
          {"cpu_standin", g.cpu_standin}};
}

json to_json(const LinkProfile& l) {
  return {{"name", l.name},
          {"source", l.source},
          {"h2d", curve_json(l.h2d)},
          {"d2h", curve_json(l.d2h)},
          {"duplex_factor", l.duplex_factor}};
}

json to_json(const HostProfile& h) {
  return {{"name", h.name},
          {"source", h.source},
          {"memory_bytes", h.memory_bytes},
          {"read_gbps", h.read_gbps},
          {"cores", h.cores},
          {"score_gbps", h.score_gbps},
          {"attend_gbps", h.attend_gbps},
          {"topk_gbps", h.topk_gbps},
          {"prepare_us_per_list", h.prepare_us_per_list},
          {"plan_us_per_block", h.plan_us_per_block},
          {"step_overhead_us", h.step_overhead_us},
          {"attend_call_us", h.attend_call_us},
          {"prefill_stage_gbps", h.prefill_stage_gbps},
          {"prefill_query_gbps", h.prefill_query_gbps}};
}

json to_json(const NvmeProfile& n) {
  return {{"name", n.name},
          {"source", n.source},
          {"capacity_bytes", n.capacity_bytes},
          {"latency_us", n.latency_us},
          {"read", grid_json(n.read)},
          {"write", grid_json(n.write)}};
}

json to_json(const MachineProfile& m) {
  return {{"name", m.name},
          {"gpu", to_json(m.gpu)},
          {"link", to_json(m.link)},
          {"host", to_json(m.host)},
          {"nvme", to_json(m.nvme)}};
}

Result<MachineProfile> compose_machine(std::string_view spec) {
  if (trim(spec).empty())
    return invalid_argument("machine spec is empty: give e.g. 'rtx4090,ddr5-128g,nvme-gen4'; presets are " +
                            all_preset_names());
  Result<MachineProfile> m = compose_tokens(split_spec(spec));
  if (!m.ok()) return m.status().with_context("machine '" + std::string(spec) + "'");
  return m;
}

Result<MachineProfile> load_machine_profile(const fs::path& path) {
  KVT_ASSIGN_OR_RETURN(const json j, read_json_file(path));
  return parse_machine_profile_json(j, path.string());
}

std::vector<std::string> preset_names(MachinePart part) {
  switch (part) {
    case MachinePart::kGpu: return names_of(detail::gpu_presets());
    case MachinePart::kLink: return names_of(detail::link_presets());
    case MachinePart::kHost: return names_of(detail::host_presets());
    case MachinePart::kNvme: return names_of(detail::nvme_presets());
  }
  return {};
}

}  // namespace kvtier::scheduler
