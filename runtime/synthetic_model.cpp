#include "kvtier/runtime/synthetic_model.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <numbers>
#include <string>
#include <utility>

#include "kvtier/core/assert.h"

namespace kvtier::runtime {
namespace {

// Independent random streams of one seed.
enum class Stream : uint64_t { kKeyNoise = 1, kQueryNoise = 2, kProjection = 3, kNeedle = 4 };
enum class Matrix : uint64_t { kQ = 0, kK = 1, kV = 2 };

constexpr uint32_t kTileTokens = 256;         // tokens whose latents are built at once
constexpr uint32_t kQueryCheckpointSteps = 64;  // decode latents kept every this many steps
constexpr uint64_t kDecodeStepsMax = uint64_t{1} << 32;
constexpr double kKeyFilterTail = 1e-3;       // the window ends where a^i falls below this

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A counter-based generator: the value at `index` of `stream` needs no state.
struct Counter {
  uint64_t key;
  Counter(uint64_t seed, Stream stream) : key(splitmix64(seed ^ splitmix64(static_cast<uint64_t>(stream)))) {}
  uint64_t bits(uint64_t index) const { return splitmix64(key + index * 0x9e3779b97f4a7c15ull); }
  // Unit-variance noise: four 16-bit uniforms summed (Irwin-Hall), centred and scaled.
  float noise(uint64_t index) const {
    const uint64_t b = bits(index);
    const int32_t sum = static_cast<int32_t>((b & 0xffff) + ((b >> 16) & 0xffff) + ((b >> 32) & 0xffff) + (b >> 48));
    // Each 16-bit uniform has variance (65536^2 - 1) / 12, so the sum has std ~65536 / sqrt(3).
    return static_cast<float>((sum - 131070) * (std::numbers::sqrt3 / 65536.0));
  }
  // A standard normal (Box-Muller), for the fixed projections.
  float normal(uint64_t index) const {
    const uint64_t b = bits(index);
    const double u1 = (static_cast<double>(b >> 40) + 0.5) / 16777216.0;  // (0, 1): log() stays finite
    const double u2 = static_cast<double>(b & 0xffffff) / 16777216.0;
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
  }
};

// out[r] = sum_j wt[j][r] * x[j] over rows r. Each output adds its terms in
// the order j = 0, 1, ... whichever token or range it belongs to, so
// regenerated values match bit for bit. Rows go in groups of kRowBlock whose
// sums stay in registers (the inner loop vectorises), which is what makes the
// projection compute-bound rather than bound by loads and stores of out.
constexpr uint32_t kRowBlock = 32;

void project(const std::vector<float>& wt, uint32_t rows, std::span<const float> x, std::span<float> out) {
  KVT_ASSERT(rows % kRowBlock == 0, "projection of ", rows, " rows (a multiple of ", kRowBlock, " is needed)");
  for (uint32_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    float acc[kRowBlock] = {};
    const float* w = wt.data() + r0;
    for (size_t j = 0; j < x.size(); ++j, w += rows) {
      const float xj = x[j];
      for (uint32_t r = 0; r < kRowBlock; ++r) acc[r] += w[r] * xj;
    }
    std::copy(acc, acc + kRowBlock, out.data() + r0);
  }
}

void round_into(std::span<const float> in, bf16* out) {
  for (size_t i = 0; i < in.size(); ++i) out[i] = bf16::from_float(in[i]);
}

Status check_needle(const Needle& n, size_t i, uint64_t context_tokens) {
  const std::string what = "synthetic model needle " + std::to_string(i);
  if (n.tokens < 1 || n.tokens > 4096) return invalid_field(what, "tokens", n.tokens, "is outside 1..4096");
  if (!(n.depth >= 0.0 && n.depth <= 1.0))
    return invalid_argument(what + ": depth=" + std::to_string(n.depth) + " is outside [0, 1]");
  if (!std::isfinite(n.strength))
    return invalid_argument(what + ": strength=" + std::to_string(n.strength) + " is not finite");
  if (!(n.key_norm > 0.f && n.key_norm <= 64.f))
    return invalid_argument(what + ": key_norm=" + std::to_string(n.key_norm) + " is outside (0, 64]");
  if (n.tokens > context_tokens)
    return invalid_field(what, "tokens", n.tokens, "exceeds context_tokens=" + std::to_string(context_tokens));
  if (n.first_token && *n.first_token > context_tokens - n.tokens)
    return invalid_field(what, "first_token", *n.first_token,
                         "puts the needle past context_tokens=" + std::to_string(context_tokens));
  return Status::ok_status();
}

Status check_options(const SyntheticModelOptions& o) {
  KVT_RETURN_IF_ERROR(validate(o.shape).with_context("synthetic model"));
  if (o.hidden < 1 || o.hidden > 4096)
    return invalid_field("synthetic model", "hidden", o.hidden, "is outside 1..4096");
  if (!(o.query_correlation >= 0.0 && o.query_correlation <= 1.0))
    return invalid_argument("synthetic model: query_correlation=" + std::to_string(o.query_correlation) +
                            " is outside [0, 1]");
  if (!(o.key_correlation >= 0.0 && o.key_correlation <= 0.995))
    return invalid_argument("synthetic model: key_correlation=" + std::to_string(o.key_correlation) +
                            " is outside [0, 0.995] (the filter window grows as -1/ln(a))");
  if (!(o.logit_std > 0.0 && o.logit_std <= 64.0))
    return invalid_argument("synthetic model: logit_std=" + std::to_string(o.logit_std) + " is outside (0, 64]");
  for (size_t i = 0; i < o.needles.size(); ++i) KVT_RETURN_IF_ERROR(check_needle(o.needles[i], i, o.context_tokens));
  return Status::ok_status();
}

// Truncated exponential filter taps a^i, normalised to unit output variance.
std::vector<float> key_filter(double a) {
  uint32_t taps = 1;
  if (a > 0.0) taps = static_cast<uint32_t>(std::ceil(std::log(kKeyFilterTail) / std::log(a)));
  std::vector<double> h(std::max(taps, 1u));
  double energy = 0.0;
  for (size_t i = 0; i < h.size(); ++i) {
    h[i] = std::pow(a, static_cast<double>(i));
    energy += h[i] * h[i];
  }
  std::vector<float> out(h.size());
  for (size_t i = 0; i < h.size(); ++i) out[i] = static_cast<float>(h[i] / std::sqrt(energy));
  return out;
}

uint64_t needle_first_token(const Needle& n, uint64_t context_tokens) {
  if (n.first_token) return *n.first_token;
  return static_cast<uint64_t>(std::llround(n.depth * static_cast<double>(context_tokens - n.tokens)));
}

}  // namespace

// One layer's projections, stored transposed ([hidden][rows]) for project(),
// and the needle directions [needle][kv_head][head_dim] (unit vectors).
struct LayerWeights {
  std::vector<float> wq_t, wk_t, wv_t;
  std::vector<float> needle_dirs;
};

struct SyntheticModel::State {
  SyntheticModelOptions options;
  std::vector<float> key_taps;
  std::vector<uint64_t> needle_first;  // first token of each needle
  Counter key_noise, query_noise, projection, needle_noise;
  std::vector<std::once_flag> layer_once;
  std::vector<std::unique_ptr<LayerWeights>> layers;
  std::mutex query_mutex;
  std::vector<float> query_checkpoints;  // y at steps 0, 64, 128, ... [checkpoint][hidden]

  explicit State(SyntheticModelOptions o)
      : options(std::move(o)),
        key_taps(key_filter(options.key_correlation)),
        key_noise(options.seed, Stream::kKeyNoise),
        query_noise(options.seed, Stream::kQueryNoise),
        projection(options.seed, Stream::kProjection),
        needle_noise(options.seed, Stream::kNeedle),
        layer_once(options.shape.layers),
        layers(options.shape.layers) {
    for (const Needle& n : options.needles) needle_first.push_back(needle_first_token(n, options.context_tokens));
  }

  uint32_t kv_rows() const { return options.shape.kv_heads * options.shape.head_dim; }
  uint32_t q_rows() const { return options.shape.q_heads * options.shape.head_dim; }

  std::vector<float> matrix(uint32_t layer, Matrix m, uint32_t rows, float scale) const {
    const uint64_t base = ((uint64_t{layer} * 4 + static_cast<uint64_t>(m)) << 40);
    std::vector<float> w(size_t{options.hidden} * rows);
    for (size_t i = 0; i < w.size(); ++i) w[i] = projection.normal(base + i) * scale;
    return w;
  }

  // Unit needle directions [needle][kv_head][head_dim]. Per (layer, KV head)
  // they are made mutually orthogonal (Gram-Schmidt, first head_dim needles)
  // so that one needle's query does not score another needle's keys.
  std::vector<float> needle_directions(uint32_t layer) const {
    const uint32_t d = options.shape.head_dim, heads = options.shape.kv_heads;
    const size_t needles = options.needles.size(), per_layer = needles * heads * d;
    std::vector<float> u(per_layer);
    for (size_t i = 0; i < per_layer; ++i) u[i] = needle_noise.normal(layer * per_layer + i);
    for (uint32_t h = 0; h < heads; ++h) {
      for (size_t i = 0; i < needles; ++i) {
        float* v = u.data() + (i * heads + h) * d;
        const size_t against = i < d ? i : 0;  // past head_dim needles, orthogonality is impossible
        for (size_t j = 0; j < against; ++j) {
          const float* w = u.data() + (j * heads + h) * d;
          double along = 0.0;
          for (uint32_t e = 0; e < d; ++e) along += double{v[e]} * w[e];
          for (uint32_t e = 0; e < d; ++e) v[e] -= static_cast<float>(along) * w[e];
        }
        double norm2 = 0.0;
        for (uint32_t e = 0; e < d; ++e) norm2 += double{v[e]} * v[e];
        const float inv = static_cast<float>(1.0 / std::sqrt(norm2));
        for (uint32_t e = 0; e < d; ++e) v[e] *= inv;
      }
    }
    return u;
  }

  const LayerWeights& layer(uint32_t l) {
    KVT_ASSERT(l < options.shape.layers, "layer ", l, " of a ", options.shape.layers, "-layer model");
    std::call_once(layer_once[l], [&] {
      const float unit = static_cast<float>(1.0 / std::sqrt(static_cast<double>(options.hidden)));
      auto w = std::make_unique<LayerWeights>();
      w->wq_t = matrix(l, Matrix::kQ, q_rows(), unit * static_cast<float>(options.logit_std));
      w->wk_t = matrix(l, Matrix::kK, kv_rows(), unit);
      w->wv_t = matrix(l, Matrix::kV, kv_rows(), unit);
      w->needle_dirs = needle_directions(l);
      layers[l] = std::move(w);
    });
    return *layers[l];
  }

  // Context latents of tokens [first, first + n), n <= kTileTokens: [n][hidden].
  void context_latents(uint64_t first, uint32_t n, std::vector<float>& noise, std::vector<float>& x) const {
    const uint32_t hidden = options.hidden, taps = static_cast<uint32_t>(key_taps.size());
    const uint32_t rows = n + taps - 1;  // noise of tokens first - taps + 1 .. first + n - 1
    noise.resize(size_t{rows} * hidden);
    // Tokens before 0 index the noise stream modulo 2^64: the process is stationary from token 0 on.
    const uint64_t noise_first = first - (taps - 1);
    for (uint32_t r = 0; r < rows; ++r)
      for (uint32_t j = 0; j < hidden; ++j)
        noise[size_t{r} * hidden + j] = key_noise.noise((noise_first + r) * hidden + j);
    x.assign(size_t{n} * hidden, 0.f);
    for (uint32_t t = 0; t < n; ++t) {
      float* out = x.data() + size_t{t} * hidden;
      for (uint32_t i = 0; i < taps; ++i) {
        const float h = key_taps[i];
        const float* src = noise.data() + size_t{t + taps - 1 - i} * hidden;
        for (uint32_t j = 0; j < hidden; ++j) out[j] += h * src[j];
      }
    }
  }

  // Adds the planted component of every needle covering `token` to its keys [kv_heads][head_dim].
  void plant_needles(const LayerWeights& w, uint64_t token, std::span<float> k) const {
    const uint32_t d = options.shape.head_dim, heads = options.shape.kv_heads;
    for (size_t i = 0; i < options.needles.size(); ++i) {
      const Needle& n = options.needles[i];
      if (token < needle_first[i] || token >= needle_first[i] + n.tokens) continue;
      const float amplitude = n.key_norm * std::sqrt(static_cast<float>(d));
      const float* u = w.needle_dirs.data() + i * heads * d;
      for (uint32_t r = 0; r < heads * d; ++r) k[r] += amplitude * u[r];
    }
  }

  // The decode latent y at `step` (the AR(1) over steps), [hidden].
  std::vector<float> query_latent(uint64_t step) {
    KVT_ASSERT(step < kDecodeStepsMax, "decode step ", step, " is past the model's bound ", kDecodeStepsMax);
    const uint32_t hidden = options.hidden;
    const uint64_t checkpoint = step / kQueryCheckpointSteps;
    std::vector<float> y(hidden);
    {
      std::lock_guard lock(query_mutex);
      if (query_checkpoints.empty())
        for (uint32_t j = 0; j < hidden; ++j) query_checkpoints.push_back(query_noise.noise(j));
      while (query_checkpoints.size() / hidden <= checkpoint) {
        const uint64_t from = (query_checkpoints.size() / hidden - 1) * kQueryCheckpointSteps;
        y.assign(query_checkpoints.end() - hidden, query_checkpoints.end());
        advance(y, from, from + kQueryCheckpointSteps);
        query_checkpoints.insert(query_checkpoints.end(), y.begin(), y.end());
      }
      y.assign(query_checkpoints.begin() + checkpoint * hidden, query_checkpoints.begin() + (checkpoint + 1) * hidden);
    }
    advance(y, checkpoint * kQueryCheckpointSteps, step);
    return y;
  }

  // y_{from} -> y_{to}: y_s = rho y_{s-1} + sqrt(1 - rho^2) eta_s.
  void advance(std::vector<float>& y, uint64_t from, uint64_t to) const {
    const float rho = static_cast<float>(options.query_correlation);
    const float innovation = static_cast<float>(std::sqrt(1.0 - options.query_correlation * options.query_correlation));
    const uint32_t hidden = options.hidden;
    for (uint64_t s = from + 1; s <= to; ++s)
      for (uint32_t j = 0; j < hidden; ++j) y[j] = rho * y[j] + innovation * query_noise.noise(s * hidden + j);
  }

  // Replaces q's component along each asking needle's direction by strength / key_norm,
  // so that a needle token scores `strength` more (after the softmax scale) than without.
  // A step that asks removes q's components along the other needles' directions
  // first: otherwise a random component along one of them, times that
  // needle's planted key, can outscore the needle asked for (seen once in 40+
  // random seeds of the needle test). Steps that ask nothing are unchanged.
  void ask_needles(const LayerWeights& w, uint64_t step, std::span<float> q) const {
    const uint32_t d = options.shape.head_dim, heads = options.shape.kv_heads, group = options.shape.group_size();
    const auto asks = [&](const Needle& n) { return !n.query_step || *n.query_step == step; };
    if (std::none_of(options.needles.begin(), options.needles.end(), asks)) return;
    for (size_t j = 0; j < options.needles.size(); ++j) {
      if (asks(options.needles[j])) continue;
      for (uint32_t g = 0; g < options.shape.q_heads; ++g) {
        const float* u = w.needle_dirs.data() + (j * heads + g / group) * d;
        float* qg = q.data() + size_t{g} * d;
        float along = 0.f;
        for (uint32_t e = 0; e < d; ++e) along += qg[e] * u[e];
        for (uint32_t e = 0; e < d; ++e) qg[e] -= along * u[e];
      }
    }
    for (size_t i = 0; i < options.needles.size(); ++i) {
      const Needle& n = options.needles[i];
      if (!asks(n)) continue;
      const float target = n.strength / n.key_norm;
      for (uint32_t g = 0; g < options.shape.q_heads; ++g) {
        const float* u = w.needle_dirs.data() + (i * heads + g / group) * d;
        float* qg = q.data() + size_t{g} * d;
        float along = 0.f;
        for (uint32_t e = 0; e < d; ++e) along += qg[e] * u[e];
        for (uint32_t e = 0; e < d; ++e) qg[e] += (target - along) * u[e];
      }
    }
  }
};

Result<SyntheticModel> SyntheticModel::create(SyntheticModelOptions options) {
  KVT_RETURN_IF_ERROR(check_options(options));
  return SyntheticModel(std::make_unique<State>(std::move(options)));
}

SyntheticModel::SyntheticModel(std::unique_ptr<State> state) : state_(std::move(state)) {}
SyntheticModel::SyntheticModel(SyntheticModel&&) noexcept = default;
SyntheticModel& SyntheticModel::operator=(SyntheticModel&&) noexcept = default;
SyntheticModel::~SyntheticModel() = default;

const SyntheticModelOptions& SyntheticModel::options() const { return state_->options; }
const ModelShape& SyntheticModel::shape() const { return state_->options.shape; }
uint32_t SyntheticModel::key_filter_taps() const { return static_cast<uint32_t>(state_->key_taps.size()); }
double SyntheticModel::softmax_scale() const { return 1.0 / std::sqrt(static_cast<double>(shape().head_dim)); }

void SyntheticModel::kv(uint32_t layer, uint64_t first_token, uint64_t n, std::span<bf16> k_out,
                        std::span<bf16> v_out) const {
  State& s = *state_;
  const uint32_t rows = s.kv_rows();
  KVT_ASSERT(k_out.size() == n * rows, "k_out has ", k_out.size(), " elements, ", n, " tokens need ", n * rows);
  KVT_ASSERT(v_out.empty() || v_out.size() == n * rows, "v_out has ", v_out.size(), " elements, ", n,
             " tokens need ", n * rows);
  KVT_ASSERT(first_token + n >= first_token, "token range overflows: ", first_token, " + ", n);
  const LayerWeights& w = s.layer(layer);
  std::vector<float> noise, x, k(rows), v(rows);
  for (uint64_t t0 = 0; t0 < n; t0 += kTileTokens) {
    const uint32_t m = static_cast<uint32_t>(std::min<uint64_t>(kTileTokens, n - t0));
    s.context_latents(first_token + t0, m, noise, x);
    for (uint32_t t = 0; t < m; ++t) {
      const std::span<const float> xt(x.data() + size_t{t} * s.options.hidden, s.options.hidden);
      project(w.wk_t, rows, xt, k);
      s.plant_needles(w, first_token + t0 + t, k);
      round_into(k, k_out.data() + (t0 + t) * rows);
      if (v_out.empty()) continue;
      project(w.wv_t, rows, xt, v);
      round_into(v, v_out.data() + (t0 + t) * rows);
    }
  }
}

void SyntheticModel::keys(uint32_t layer, uint64_t first_token, uint64_t n, std::span<bf16> k_out) const {
  kv(layer, first_token, n, k_out, {});
}

void SyntheticModel::prefill_query(uint32_t layer, uint64_t first_token, uint64_t n, std::span<bf16> q_out) const {
  State& s = *state_;
  const uint32_t rows = s.q_rows();
  KVT_ASSERT(q_out.size() == n * rows, "q_out has ", q_out.size(), " elements, ", n, " tokens need ", n * rows);
  const LayerWeights& w = s.layer(layer);
  std::vector<float> noise, x, q(rows);
  for (uint64_t t0 = 0; t0 < n; t0 += kTileTokens) {
    const uint32_t m = static_cast<uint32_t>(std::min<uint64_t>(kTileTokens, n - t0));
    s.context_latents(first_token + t0, m, noise, x);
    for (uint32_t t = 0; t < m; ++t) {
      project(w.wq_t, rows, std::span<const float>(x.data() + size_t{t} * s.options.hidden, s.options.hidden), q);
      round_into(q, q_out.data() + (t0 + t) * rows);
    }
  }
}

void SyntheticModel::decode_query(uint32_t layer, uint64_t step, std::span<bf16> q_out) const {
  State& s = *state_;
  const uint32_t rows = s.q_rows();
  KVT_ASSERT(q_out.size() == rows, "q_out has ", q_out.size(), " elements, a decode query needs ", rows);
  const LayerWeights& w = s.layer(layer);
  const std::vector<float> y = s.query_latent(step);
  std::vector<float> q(rows);
  project(w.wq_t, rows, y, q);
  s.ask_needles(w, step, q);
  round_into(q, q_out.data());
}

std::vector<NeedlePlacement> SyntheticModel::needle_placements(uint32_t chunk_tokens) const {
  KVT_ASSERT(chunk_tokens > 0, "chunk_tokens must be positive");
  std::vector<NeedlePlacement> out;
  for (size_t i = 0; i < state_->needle_first.size(); ++i) {
    NeedlePlacement p;
    p.first_token = state_->needle_first[i];
    p.tokens = state_->options.needles[i].tokens;
    p.first_block = static_cast<uint32_t>(p.first_token / chunk_tokens);
    p.last_block = static_cast<uint32_t>((p.first_token + p.tokens - 1) / chunk_tokens);
    uint64_t best_tokens = 0;
    for (uint32_t b = p.first_block; b <= p.last_block; ++b) {
      const uint64_t lo = std::max<uint64_t>(p.first_token, uint64_t{b} * chunk_tokens);
      const uint64_t hi = std::min<uint64_t>(p.first_token + p.tokens, uint64_t{b + 1} * chunk_tokens);
      if (hi - lo > best_tokens) best_tokens = hi - lo, p.block = b;
    }
    out.push_back(p);
  }
  return out;
}

std::vector<uint32_t> SyntheticModel::needle_blocks(uint32_t chunk_tokens) const {
  std::vector<uint32_t> out;
  for (const NeedlePlacement& p : needle_placements(chunk_tokens)) out.push_back(p.block);
  return out;
}

}  // namespace kvtier::runtime
