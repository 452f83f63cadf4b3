// append_kv, append_kv_range and build_summaries against host models:
// appends must change exactly the target rows of a poisoned arena, bit-exact;
// summaries must match an fp64 oracle to fp32 rounding and the CPU scorer's
// own build_summary in the SummaryTable layout. KVTIER_TEST_QUICK=1 runs a
// smaller sweep (for compute-sanitizer). Exits 77 without a CUDA build or GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "gpu_test_util.h"
#include "kvtier/cpu/kernels.h"
#include "kvtier/gpu/kernels.h"
#include "random.h"
#include "skip.h"

using namespace kvtier;
using test::cuda_context_or_skip;
using test::DeviceBuffer;

namespace {

void require_ok(const Status& s) { REQUIRE_MESSAGE(s.ok(), s.to_string()); }

// A device slot arena and its host twin. Slots carry 32 bytes of padding past
// the block so that a kernel that strides by the block size instead of
// slot_bytes writes where it should not. Filled with random bits: whatever a
// kernel should not touch must come back unchanged.
struct ArenaRig {
  uint32_t slots, chunk_tokens, head_dim;
  uint64_t slot_elems;
  std::vector<bf16> host;
  DeviceBuffer<bf16> device;

  static constexpr uint64_t kPadElems = 16;

  ArenaRig(gpu::CudaContext& ctx, uint32_t slots_, uint32_t chunk, uint32_t dim, std::mt19937_64& gen)
      : slots(slots_), chunk_tokens(chunk), head_dim(dim),
        slot_elems(2ull * chunk * dim + kPadElems),
        host(random_bits(slots_ * slot_elems, gen)),
        device(ctx, host) {}

  static std::vector<bf16> random_bits(uint64_t n, std::mt19937_64& gen) {
    std::vector<bf16> out(n);
    for (bf16& x : out) x = bf16::from_bits(static_cast<uint16_t>(gen()));
    return out;
  }

  gpu::SlotArenaView view() const {
    return gpu::SlotArenaView{reinterpret_cast<std::byte*>(device.get()), slot_elems * sizeof(bf16), slots,
                              chunk_tokens, head_dim};
  }
  // Row `row` of K (kv 0) or V (kv 1) of slot `slot` in the host twin.
  bf16* host_row(uint32_t slot, uint32_t kv, uint32_t row) {
    return host.data() + slot * slot_elems + (uint64_t{kv} * chunk_tokens + row) * head_dim;
  }

  // The device arena must equal the host twin bit for bit.
  void check_matches() const {
    const std::vector<bf16> got = device.download();
    REQUIRE(got.size() == host.size());
    uint64_t bad = 0;
    for (uint64_t i = 0; i < got.size(); ++i) {
      if (got[i].bits == host[i].bits) continue;
      if (bad++ < 5) {
        const uint64_t slot = i / slot_elems, in_slot = i % slot_elems;
        FAIL_CHECK("slot ", slot, " element ", in_slot, " (", in_slot < uint64_t{chunk_tokens} * head_dim ? "K" : "V or pad",
                   " row ", (in_slot / head_dim) % chunk_tokens, ") is 0x", std::hex, got[i].bits, ", expected 0x",
                   host[i].bits, std::dec);
      }
    }
    CHECK_MESSAGE(bad == 0, bad, " arena elements differ");
  }
};

// `count` distinct slot ids out of `slots`, in random order.
std::vector<uint32_t> scattered_slots(uint32_t count, uint32_t slots, std::mt19937_64& gen) {
  std::vector<uint32_t> all(slots);
  std::iota(all.begin(), all.end(), 0u);
  std::shuffle(all.begin(), all.end(), gen);
  all.resize(count);
  return all;
}

std::vector<uint32_t> chunk_sizes() { return test::quick_sweep() ? std::vector<uint32_t>{16, 64} : std::vector<uint32_t>{16, 64, 256}; }

}  // namespace

// ---- append_kv -------------------------------------------------------------------

TEST_CASE("append_kv writes each sequence's K and V row into its slots and nothing else") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const std::vector<uint32_t> batches = test::quick_sweep() ? std::vector<uint32_t>{1, 3} : std::vector<uint32_t>{1, 3, 17};
  for (const uint32_t dim : {64u, 128u}) {
    for (const uint32_t chunk : chunk_sizes()) {
      for (const uint32_t batch : batches) {
        for (const bool aligned : {true, false}) {
          CAPTURE(dim);
          CAPTURE(chunk);
          CAPTURE(batch);
          CAPTURE(aligned);
          auto gen = test::rng(dim * 7919 + chunk * 31 + batch * 2 + aligned);
          const uint32_t kv_heads = batch == 1 ? 8 : 3;
          const uint32_t items = batch * kv_heads;
          ArenaRig arena(ctx, 2 * items + 3, chunk, dim, gen);
          const std::vector<bf16> k = test::random_bf16(uint64_t{items} * dim, gen);
          const std::vector<bf16> v = test::random_bf16(uint64_t{items} * dim, gen);
          const std::vector<uint32_t> slots = scattered_slots(items, arena.slots, gen);
          std::vector<uint32_t> rows(batch);
          for (uint32_t& r : rows) r = static_cast<uint32_t>(gen() % chunk);
          rows[0] = chunk - 1;  // the last row of a slot, where an off-by-one writes past it

          // Sources offset by one element take the 2-byte path.
          const uint32_t off = aligned ? 0 : 1;
          std::vector<bf16> k_src(off), v_src(off);
          k_src.insert(k_src.end(), k.begin(), k.end());
          v_src.insert(v_src.end(), v.begin(), v.end());
          DeviceBuffer<bf16> k_dev(ctx, k_src), v_dev(ctx, v_src);
          DeviceBuffer<uint32_t> slots_dev(ctx, slots), rows_dev(ctx, rows);

          gpu::AppendArgs args;
          args.k = k_dev.get() + off;
          args.v = v_dev.get() + off;
          args.batch = batch;
          args.kv_heads = kv_heads;
          args.arena = arena.view();
          args.slots = slots_dev.get();
          args.rows = rows_dev.get();
          require_ok(gpu::append_kv(args, ctx.compute_stream()));
          test::sync_or_fail(ctx);

          for (uint32_t b = 0; b < batch; ++b) {
            for (uint32_t h = 0; h < kv_heads; ++h) {
              const uint64_t item = uint64_t{b} * kv_heads + h;
              std::memcpy(arena.host_row(slots[item], 0, rows[b]), k.data() + item * dim, dim * sizeof(bf16));
              std::memcpy(arena.host_row(slots[item], 1, rows[b]), v.data() + item * dim, dim * sizeof(bf16));
            }
          }
          arena.check_matches();
        }
      }
    }
  }
}

// ---- append_kv_range ------------------------------------------------------------

TEST_CASE("append_kv_range lays consecutive tokens across chunks from an unaligned first token") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const std::vector<uint32_t> token_counts =
      test::quick_sweep() ? std::vector<uint32_t>{1, 17, 97} : std::vector<uint32_t>{1, 17, 97, 1000};
  for (const uint32_t dim : {64u, 128u}) {
    for (const uint32_t chunk : chunk_sizes()) {
      for (const uint32_t tokens : token_counts) {
        CAPTURE(dim);
        CAPTURE(chunk);
        CAPTURE(tokens);
        auto gen = test::rng(dim * 104729 + chunk * 7 + tokens);
        const uint32_t kv_heads = 3;
        // Not chunk-aligned (unless chunk 16 draws 0), and past chunk 0 so
        // that c0 matters.
        const uint64_t first_token = uint64_t{chunk} * (5 + gen() % 1000) + gen() % chunk;
        const uint64_t c0 = first_token / chunk;
        const uint32_t chunks = static_cast<uint32_t>((first_token + tokens - 1) / chunk - c0 + 1);
        ArenaRig arena(ctx, kv_heads * chunks + 5, chunk, dim, gen);
        const std::vector<bf16> k = test::random_bf16(uint64_t{tokens} * kv_heads * dim, gen);
        const std::vector<bf16> v = test::random_bf16(uint64_t{tokens} * kv_heads * dim, gen);
        const std::vector<uint32_t> slots = scattered_slots(kv_heads * chunks, arena.slots, gen);
        DeviceBuffer<bf16> k_dev(ctx, k), v_dev(ctx, v);
        DeviceBuffer<uint32_t> slots_dev(ctx, slots);

        gpu::AppendRangeArgs args;
        args.k = k_dev.get();
        args.v = v_dev.get();
        args.tokens = tokens;
        args.kv_heads = kv_heads;
        args.first_token = first_token;
        args.arena = arena.view();
        args.slots = slots_dev.get();
        require_ok(gpu::append_kv_range(args, ctx.compute_stream()));
        test::sync_or_fail(ctx);

        for (uint32_t t = 0; t < tokens; ++t) {
          const uint64_t pos = first_token + t;
          const uint32_t c = static_cast<uint32_t>(pos / chunk - c0), row = static_cast<uint32_t>(pos % chunk);
          for (uint32_t h = 0; h < kv_heads; ++h) {
            const uint32_t slot = slots[uint64_t{h} * chunks + c];
            const uint64_t src = (uint64_t{t} * kv_heads + h) * dim;
            std::memcpy(arena.host_row(slot, 0, row), k.data() + src, dim * sizeof(bf16));
            std::memcpy(arena.host_row(slot, 1, row), v.data() + src, dim * sizeof(bf16));
          }
        }
        arena.check_matches();
      }
    }
  }
}

TEST_CASE("append_kv_range of zero tokens writes nothing") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  auto gen = test::rng(5);
  ArenaRig arena(ctx, 2, 64, 128, gen);
  gpu::AppendRangeArgs args;
  args.kv_heads = 1;
  args.arena = arena.view();
  require_ok(gpu::append_kv_range(args, ctx.compute_stream()));
  test::sync_or_fail(ctx);
  arena.check_matches();
}

// ---- build_summaries -----------------------------------------------------------

namespace {

struct SummaryCase {
  uint32_t dim, chunk, count;
  uint32_t f32_stride, bf16_stride;
};

// Device outputs, poisoned (0xFF bytes: NaN) so that an unwritten element
// fails and a padding element that was written shows.
struct SummaryOutputs {
  DeviceBuffer<float> kmean, kmin, kmax, vmean;
  DeviceBuffer<bf16> kmean_bf16;
  SummaryOutputs(gpu::CudaContext& ctx, const SummaryCase& c)
      : kmean(ctx, uint64_t{c.count} * c.f32_stride), kmin(ctx, uint64_t{c.count} * c.f32_stride),
        kmax(ctx, uint64_t{c.count} * c.f32_stride), vmean(ctx, uint64_t{c.count} * c.f32_stride),
        kmean_bf16(ctx, uint64_t{c.count} * c.bf16_stride) {
    kmean.poison();
    kmin.poison();
    kmax.poison();
    vmean.poison();
    kmean_bf16.poison();
  }
};

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Padding past head_dim must still hold the poison.
template <class T>
void check_padding_untouched(const std::vector<T>& got, uint32_t count, uint32_t stride, uint32_t dim, const char* what) {
  uint64_t touched = 0;
  for (uint32_t i = 0; i < count; ++i)
    for (uint32_t d = dim; d < stride; ++d) {
      T x = got[uint64_t{i} * stride + d];
      unsigned char bytes[sizeof(T)];
      std::memcpy(bytes, &x, sizeof(T));
      touched += std::any_of(bytes, bytes + sizeof(T), [](unsigned char b) { return b != 0xFF; });
    }
  CHECK_MESSAGE(touched == 0, what, ": ", touched, " padding elements written");
}

// fp64 mean, min and max of dim d over rows [0, n) of a K or V matrix.
struct Oracle {
  double mean = 0, mean_abs = 0, lo = 0, hi = 0;
};
Oracle oracle(const bf16* rows, uint32_t n, uint32_t dim, uint32_t d) {
  if (n == 0) return {};
  Oracle o{0, 0, INFINITY, -INFINITY};
  for (uint32_t t = 0; t < n; ++t) {
    const double x = rows[uint64_t{t} * dim + d].to_float();
    o.mean += x;
    o.mean_abs += std::fabs(x);
    o.lo = std::min(o.lo, x);
    o.hi = std::max(o.hi, x);
  }
  o.mean /= n;
  o.mean_abs /= n;
  return o;
}

// A sequential fp32 sum of n terms is within (n - 1) * 2^-24 * sum|x| of
// the exact one; the division adds half an ulp. Scaled by mean |x|.
bool close_to_mean(float got, const Oracle& o, uint32_t n) {
  const double tol = (n + 1) * 0x1p-24 * o.mean_abs + 1e-30;
  return std::fabs(got - o.mean) <= tol;
}

void run_summary_case(gpu::CudaContext& ctx, const SummaryCase& c, uint64_t salt) {
  CAPTURE(c.dim);
  CAPTURE(c.chunk);
  CAPTURE(c.count);
  CAPTURE(c.f32_stride);
  auto gen = test::rng(salt);
  const uint32_t dim = c.dim, chunk = c.chunk;
  ArenaRig arena(ctx, c.count + 7, chunk, dim, gen);
  // Keys and values of moderate range, with an offset so that means are not
  // all near zero; padding and unlisted slots keep their random bits.
  for (uint32_t s = 0; s < arena.slots; ++s) {
    const std::vector<bf16> kv = test::random_bf16(2ull * chunk * dim, gen, -3.f, 5.f);
    std::copy(kv.begin(), kv.end(), arena.host_row(s, 0, 0));
  }
  arena.device.upload(arena.host);
  const std::vector<uint32_t> slots = scattered_slots(c.count, arena.slots, gen);
  std::vector<uint32_t> tokens(c.count);
  const uint32_t fixed[] = {1, std::min(17u, chunk), chunk, 0};
  for (uint32_t i = 0; i < c.count; ++i)
    tokens[i] = i < 4 ? fixed[i] : 1 + static_cast<uint32_t>(gen() % chunk);
  DeviceBuffer<uint32_t> slots_dev(ctx, slots), tokens_dev(ctx, tokens);
  SummaryOutputs out(ctx, c);

  gpu::SummaryArgs args;
  args.arena = arena.view();
  args.slots = slots_dev.get();
  args.tokens = tokens_dev.get();
  args.count = c.count;
  args.f32_stride = c.f32_stride;
  args.bf16_stride = c.bf16_stride;
  args.kmean = out.kmean.get();
  args.kmean_bf16 = out.kmean_bf16.get();
  args.kmin = out.kmin.get();
  args.kmax = out.kmax.get();
  args.vmean = out.vmean.get();
  require_ok(gpu::build_summaries(args, ctx.compute_stream()));
  test::sync_or_fail(ctx);
  arena.check_matches();  // summaries only read the arena

  const std::vector<float> kmean = out.kmean.download(), kmin = out.kmin.download(), kmax = out.kmax.download(),
                           vmean = out.vmean.download();
  const std::vector<bf16> kmean_bf16 = out.kmean_bf16.download();
  for (const auto* v : {&kmean, &kmin, &kmax, &vmean}) check_padding_untouched(*v, c.count, c.f32_stride, dim, "fp32 row");
  check_padding_untouched(kmean_bf16, c.count, c.bf16_stride, dim, "bf16 row");

  // Against the fp64 oracle.
  uint64_t bad = 0;
  for (uint32_t i = 0; i < c.count; ++i) {
    const bf16* k = arena.host_row(slots[i], 0, 0);
    const bf16* v = arena.host_row(slots[i], 1, 0);
    for (uint32_t d = 0; d < dim; ++d) {
      const uint64_t f = uint64_t{i} * c.f32_stride + d;
      const Oracle ko = oracle(k, tokens[i], dim, d), vo = oracle(v, tokens[i], dim, d);
      const bool ok = close_to_mean(kmean[f], ko, tokens[i]) && close_to_mean(vmean[f], vo, tokens[i]) &&
                      kmin[f] == ko.lo && kmax[f] == ko.hi &&
                      kmean_bf16[uint64_t{i} * c.bf16_stride + d] == bf16::from_float(kmean[f]);
      if (!ok && bad++ < 5) {
        FAIL_CHECK("block ", i, " (", tokens[i], " tokens) dim ", d, ": kmean ", kmean[f], " vs ", ko.mean, ", vmean ",
                   vmean[f], " vs ", vo.mean, ", kmin ", kmin[f], " vs ", ko.lo, ", kmax ", kmax[f], " vs ", ko.hi,
                   ", kmean_bf16 0x", std::hex, kmean_bf16[uint64_t{i} * c.bf16_stride + d].bits, std::dec);
      }
    }
  }
  CHECK_MESSAGE(bad == 0, bad, " summary elements wrong");

  // Against the CPU scorer's own summaries, table by table: same layout and
  // (both sum in fp32 in token order and divide) the same values.
  uint64_t mismatched = 0, compared = 0, bit_exact = 0;
  auto same = [&](float gpu_value, float cpu_value) {
    ++compared;
    bit_exact += bits_of(gpu_value) == bits_of(cpu_value);
    if (std::fabs(gpu_value - cpu_value) > 1e-6f * std::max(1.f, std::fabs(cpu_value)) && mismatched++ < 5)
      FAIL_CHECK("gpu ", gpu_value, " vs cpu ", cpu_value);
  };
  for (const SummaryKind kind : {SummaryKind::kMeanF32, SummaryKind::kMeanBf16, SummaryKind::kMinMaxF32}) {
    cpu::SummaryTable table(1, c.count, dim, kind);
    for (uint32_t i = 0; i < c.count; ++i)
      cpu::build_summary(cpu::best_isa(), cpu::HostBlock{arena.host_row(slots[i], 0, 0), tokens[i]}, chunk, table, 0, i);
    for (uint32_t i = 0; i < c.count; ++i) {
      const uint64_t f = uint64_t{i} * c.f32_stride;
      for (uint32_t d = 0; d < dim; ++d) {
        same(vmean[f + d], table.vmean(0, i)[d]);
        if (kind == SummaryKind::kMeanBf16) {
          CHECK(kmean_bf16[uint64_t{i} * c.bf16_stride + d] == table.kmean_bf16(0, i)[d]);
        } else {
          same(kmean[f + d], table.kmean_f32(0, i)[d]);
        }
        if (kind == SummaryKind::kMinMaxF32) {
          same(kmin[f + d], table.kmin(0, i)[d]);
          same(kmax[f + d], table.kmax(0, i)[d]);
        }
      }
    }
  }
  CHECK_MESSAGE(mismatched == 0, mismatched, " of ", compared, " values differ from the CPU summaries");
  MESSAGE(bit_exact, " of ", compared, " values bit-identical to the CPU summaries");
  // Both sum in fp32 in token order and divide once, so they agree bit for bit.
  CHECK(bit_exact == compared);
}

}  // namespace

TEST_CASE("build_summaries matches the fp64 oracle and the CPU SummaryTable, partial blocks included") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const uint32_t count = test::quick_sweep() ? 21 : 133;
  uint64_t salt = 100;
  for (const uint32_t dim : {64u, 128u}) {
    for (const uint32_t chunk : chunk_sizes()) {
      // The CPU table's strides (head_dim rounded up to 16 floats / 32 bf16)
      // and wider ones with padding that must be left alone.
      run_summary_case(ctx, {dim, chunk, count, (dim + 15) / 16 * 16, (dim + 31) / 32 * 32}, ++salt);
      run_summary_case(ctx, {dim, chunk, count, dim + 20, dim + 5}, ++salt);
    }
  }
}

TEST_CASE("build_summaries writes only the outputs asked for") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  auto gen = test::rng(77);
  const uint32_t dim = 128, chunk = 64, count = 9;
  ArenaRig arena(ctx, 16, chunk, dim, gen);
  // Finite values: the arena's random bits hold NaNs, which a mean keeps.
  arena.host = test::random_bf16(arena.host.size(), gen);
  arena.device.upload(arena.host);
  const std::vector<uint32_t> slots = scattered_slots(count, arena.slots, gen);
  const std::vector<uint32_t> tokens(count, chunk);
  DeviceBuffer<uint32_t> slots_dev(ctx, slots), tokens_dev(ctx, tokens);
  const SummaryCase c{dim, chunk, count, dim, dim};
  // Each output alone; the others stay poisoned.
  for (int which = 0; which < 5; ++which) {
    CAPTURE(which);
    SummaryOutputs out(ctx, c);
    gpu::SummaryArgs args;
    args.arena = arena.view();
    args.slots = slots_dev.get();
    args.tokens = tokens_dev.get();
    args.count = count;
    args.f32_stride = dim;
    args.bf16_stride = dim;
    float* f32[] = {out.kmean.get(), out.kmin.get(), out.kmax.get(), out.vmean.get()};
    if (which < 4) {
      (which == 0 ? args.kmean : which == 1 ? args.kmin : which == 2 ? args.kmax : args.vmean) = f32[which];
    } else {
      args.kmean_bf16 = out.kmean_bf16.get();
    }
    require_ok(gpu::build_summaries(args, ctx.compute_stream()));
    test::sync_or_fail(ctx);
    const std::vector<float> got[] = {out.kmean.download(), out.kmin.download(), out.kmax.download(),
                                      out.vmean.download()};
    for (int o = 0; o < 4; ++o) {
      const bool written = std::none_of(got[o].begin(), got[o].end(), [](float x) { return std::isnan(x); });
      const bool poisoned = std::all_of(got[o].begin(), got[o].end(), [](float x) { return bits_of(x) == 0xFFFFFFFFu; });
      CHECK_MESSAGE((o == which ? written : poisoned), "output ", o);
    }
    const std::vector<bf16> b = out.kmean_bf16.download();
    const bool bf16_poisoned = std::all_of(b.begin(), b.end(), [](bf16 x) { return x.bits == 0xFFFF; });
    CHECK(bf16_poisoned == (which != 4));
  }
}

// ---- Invalid arguments ------------------------------------------------------------

TEST_CASE("invalid arguments are invalid_argument Statuses and launch nothing") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  auto gen = test::rng(9);
  ArenaRig arena(ctx, 4, 64, 128, gen);
  DeviceBuffer<bf16> kv(ctx, 4 * 128);
  DeviceBuffer<uint32_t> idx(ctx, std::vector<uint32_t>{0, 1, 2, 3});
  DeviceBuffer<float> f32(ctx, 4 * 128);

  auto bad_arenas = [&] {
    std::vector<std::pair<const char*, gpu::SlotArenaView>> out;
    gpu::SlotArenaView a = arena.view();
    a.head_dim = 96;
    out.emplace_back("head_dim 96", a);
    a = arena.view();
    a.chunk_tokens = 8;
    out.emplace_back("chunk 8", a);
    a = arena.view();
    a.chunk_tokens = 512;
    out.emplace_back("chunk 512", a);
    a = arena.view();
    a.base = nullptr;
    out.emplace_back("null base", a);
    a = arena.view();
    a.base += 2;
    out.emplace_back("unaligned base", a);
    a = arena.view();
    a.slot_bytes = 2 * 64 * 128 * 2 - 16;
    out.emplace_back("slot too small", a);
    a = arena.view();
    a.slot_bytes += 8;
    out.emplace_back("slot_bytes not a multiple of 16", a);
    a = arena.view();
    a.slots = 0;
    out.emplace_back("no slots", a);
    return out;
  }();

  gpu::AppendArgs append;
  append.k = kv.get();
  append.v = kv.get();
  append.batch = 1;
  append.kv_heads = 4;
  append.arena = arena.view();
  append.slots = idx.get();
  append.rows = idx.get();
  gpu::AppendRangeArgs range;
  range.k = kv.get();
  range.v = kv.get();
  range.tokens = 1;
  range.kv_heads = 4;
  range.first_token = 0;
  range.arena = arena.view();
  range.slots = idx.get();
  gpu::SummaryArgs summary;
  summary.arena = arena.view();
  summary.slots = idx.get();
  summary.tokens = idx.get();
  summary.count = 1;
  summary.f32_stride = 128;
  summary.bf16_stride = 128;
  summary.kmean = f32.get();

  auto expect_invalid = [](const Status& s, const char* what) {
    CHECK_MESSAGE(s.code() == StatusCode::kInvalidArgument, what, ": ", s.to_string());
  };
  for (const auto& [what, a] : bad_arenas) {
    gpu::AppendArgs ap = append;
    ap.arena = a;
    expect_invalid(gpu::append_kv(ap, ctx.compute_stream()), what);
    gpu::AppendRangeArgs r = range;
    r.arena = a;
    expect_invalid(gpu::append_kv_range(r, ctx.compute_stream()), what);
    gpu::SummaryArgs s = summary;
    s.arena = a;
    expect_invalid(gpu::build_summaries(s, ctx.compute_stream()), what);
  }
  {
    gpu::AppendArgs a = append;
    a.batch = 0;
    expect_invalid(gpu::append_kv(a, ctx.compute_stream()), "batch 0");
    a = append;
    a.kv_heads = 0;
    expect_invalid(gpu::append_kv(a, ctx.compute_stream()), "kv_heads 0");
    a = append;
    a.rows = nullptr;
    expect_invalid(gpu::append_kv(a, ctx.compute_stream()), "null rows");
    a = append;
    a.k = nullptr;
    expect_invalid(gpu::append_kv(a, ctx.compute_stream()), "null k");
  }
  {
    gpu::AppendRangeArgs r = range;
    r.slots = nullptr;
    expect_invalid(gpu::append_kv_range(r, ctx.compute_stream()), "null slots");
    r = range;
    r.kv_heads = 0;
    expect_invalid(gpu::append_kv_range(r, ctx.compute_stream()), "kv_heads 0");
  }
  {
    gpu::SummaryArgs s = summary;
    s.f32_stride = 127;
    expect_invalid(gpu::build_summaries(s, ctx.compute_stream()), "f32_stride below head_dim");
    s = summary;
    s.kmean_bf16 = reinterpret_cast<bf16*>(f32.get());
    s.bf16_stride = 64;
    expect_invalid(gpu::build_summaries(s, ctx.compute_stream()), "bf16_stride below head_dim");
    s = summary;
    s.tokens = nullptr;
    expect_invalid(gpu::build_summaries(s, ctx.compute_stream()), "null tokens");
  }
  test::sync_or_fail(ctx);
  arena.check_matches();
}
