// decode_attention and merge_partials (gpu/decode.cu) against the fp64
// reference (cpu/reference.h) on random bf16 inputs: every supported head
// dim, GQA group and chunk size, list lengths 0, 1, 17 and 97 blocks, partly
// filled tail blocks, slots scattered through an arena whose unused bytes are
// NaN, outputs poisoned first. Exits 77 (skipped) without a GPU.
//
// KVTIER_TEST_QUICK=1 shrinks the sweep (chunk sizes 16, 64 and 256 only,
// shorter contexts) for runs under compute-sanitizer, where the fp64
// reference, not the kernels, is what takes the time.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "kvtier/cpu/partial_state.h"
#include "kvtier/cpu/reference.h"
#include "kvtier/gpu/device_query.h"
#include "kvtier/gpu/kernels.h"
#include "random.h"
#include "skip.h"

using namespace kvtier;
using cpu::PartialState64;
using test::cuda_context_or_skip;
using test::DeviceBuffer;
namespace ref = cpu::ref;

namespace {

// Tolerances the arithmetic earns. Inputs are bf16 and exactly the values the
// reference reads, so the only error is the kernel's arithmetic: the scores
// (a 64- or 128-term dot of bf16 products on tensor cores, fp32 accumulation,
// relative error ~1e-6), ex2.approx (~2^-22), the softmax weights P entering
// the PV product as bf16 hi + lo terms (relative error <= 2^-17 = 7.6e-6 of
// each weight), and sums over at most 4096 tokens per accumulator (one warp's
// rows of one split; worst case 4096 * 6e-8 = 2.4e-4 relative, typically
// ~sqrt(4096) * 6e-8 = 4e-6). The bound below, 5e-5 on o relative to max|v|
// (= 1 here: v is uniform in [-1, 1]) and on lse, holds the typical errors
// with room; a dropped or doubled 16-token block moves lse by at least
// 16 / 25000 = 6e-4 in the longest lists tested. The worst errors seen are
// printed at the end of the run: 1.7e-6 on o and 8.4e-7 on lse on an H200
// (tensor-core kernel, bench/results/2026-11-28-gpu-h200-tc.json).
constexpr double kOTol = 5e-5;
constexpr double kLseTol = 5e-5;
double g_worst_o = 0, g_worst_lse = 0;
constexpr float kInf = std::numeric_limits<float>::infinity();

void require_ok(const Status& s) { REQUIRE_MESSAGE(s.ok(), s.to_string()); }

// A host copy of a slot arena. Every byte starts as NaN (bf16 0xFFFF): slots
// no list names, rows past a tail block's last token and the padding after
// each block (slot_bytes is 32 bytes more than a block) must never be read.
struct HostArena {
  uint32_t chunk_tokens = 0, head_dim = 0, slots = 0;
  uint64_t slot_bytes = 0;
  std::vector<bf16> data;

  HostArena(uint32_t c, uint32_t d, uint32_t n)
      : chunk_tokens(c), head_dim(d), slots(n), slot_bytes(uint64_t{4} * c * d + 32),
        data(n * slot_bytes / 2, bf16::from_bits(0xFFFF)) {}
  size_t slot_elems() const { return slot_bytes / 2; }
  bf16* k(uint32_t slot) { return data.data() + slot * slot_elems(); }
  bf16* v(uint32_t slot) { return k(slot) + size_t{chunk_tokens} * head_dim; }
  // The first `tokens` rows of a slot as the reference reads them.
  ref::BlockKv block(uint32_t slot, uint32_t tokens) const {
    const bf16* kp = data.data() + slot * slot_elems();
    const size_t n = size_t{tokens} * head_dim;
    return {Bf16View<2>(std::span<const bf16>(kp, n), {tokens, head_dim}),
            Bf16View<2>(std::span<const bf16>(kp + size_t{chunk_tokens} * head_dim, n), {tokens, head_dim})};
  }
};

// The block lists of batch * kv_heads (sequence, KV head) pairs, as
// DecodeArgs wants them.
struct Lists {
  std::vector<uint32_t> begin{0};
  std::vector<uint32_t> slot_ids;
  std::vector<uint32_t> last_tokens;
  uint32_t max_blocks = 0;

  void add(const std::vector<uint32_t>& slots, uint32_t last) {
    slot_ids.insert(slot_ids.end(), slots.begin(), slots.end());
    begin.push_back(static_cast<uint32_t>(slot_ids.size()));
    last_tokens.push_back(last);
    max_blocks = std::max(max_blocks, static_cast<uint32_t>(slots.size()));
  }
};

struct Shape {
  uint32_t batch = 1, q_heads = 1, kv_heads = 1, head_dim = 128, chunk_tokens = 64;
  uint32_t group() const { return q_heads / kv_heads; }
  size_t rows() const { return size_t{batch} * q_heads; }
  std::string str() const {
    std::ostringstream os;
    os << "batch " << batch << " q_heads " << q_heads << " kv_heads " << kv_heads << " head_dim " << head_dim
       << " chunk_tokens " << chunk_tokens;
    return os.str();
  }
};

struct GpuState {
  std::vector<float> o, lse;
};

// Uploads everything, poisons o, lse and the workspace, runs decode_attention
// and downloads its (o, lse).
GpuState run_decode(const Shape& s, const HostArena& arena, const std::vector<bf16>& q, const Lists& lists,
                    float scale, uint32_t max_list_blocks) {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  DeviceBuffer<bf16> d_arena(ctx, arena.data), d_q(ctx, q);
  DeviceBuffer<uint32_t> d_begin(ctx, lists.begin), d_slots(ctx, lists.slot_ids), d_last(ctx, lists.last_tokens);
  DeviceBuffer<float> d_o(ctx, s.rows() * s.head_dim), d_lse(ctx, s.rows());
  d_o.poison();
  d_lse.poison();
  gpu::DecodeArgs a;
  a.q = d_q.get();
  a.batch = s.batch;
  a.q_heads = s.q_heads;
  a.kv_heads = s.kv_heads;
  a.arena = {reinterpret_cast<std::byte*>(d_arena.get()), arena.slot_bytes, arena.slots, s.chunk_tokens, s.head_dim};
  a.list_begin = d_begin.get();
  a.slot_ids = d_slots.get();
  a.last_tokens = d_last.get();
  a.max_list_blocks = max_list_blocks;
  a.scale = scale;
  a.o = d_o.get();
  a.lse = d_lse.get();
  const auto plan = gpu::decode_launch_plan(a);
  REQUIRE_MESSAGE(plan.ok(), plan.status().to_string());
  const uint64_t ws_bytes = gpu::decode_workspace_bytes(a);
  REQUIRE(ws_bytes == plan->workspace_bytes);
  DeviceBuffer<float> ws(ctx, ws_bytes / sizeof(float));
  ws.poison();  // every split must write all of its partial
  require_ok(gpu::decode_attention(a, ws_bytes > 0 ? ws.get() : nullptr, ws_bytes, ctx.compute_stream()));
  test::sync_or_fail(ctx);
  return {d_o.download(), d_lse.download()};
}

// Compares rows [row0, row0 + want.heads) of a GPU state with the reference;
// an empty reference row must be exactly (0, -inf). Reports the first miss.
void check_state(const std::vector<float>& o, const std::vector<float>& lse, size_t row0, const PartialState64& want,
                 const std::string& what) {
  const uint32_t dim = want.head_dim;
  size_t bad = 0;
  std::string first;
  for (uint32_t h = 0; h < want.heads; ++h) {
    const size_t row = row0 + h;
    const bool empty = want.lse[h] == -std::numeric_limits<double>::infinity();
    if (!empty) g_worst_lse = std::max(g_worst_lse, std::fabs(lse[row] - want.lse[h]));
    const bool lse_ok = empty ? lse[row] == -kInf : std::fabs(lse[row] - want.lse[h]) <= kLseTol;
    if (!lse_ok && bad++ == 0)
      first = "head " + std::to_string(h) + " lse " + std::to_string(lse[row]) + " want " + std::to_string(want.lse[h]);
    for (uint32_t d = 0; d < dim; ++d) {
      const double got = o[row * dim + d], ref_o = want.o[size_t{h} * dim + d];
      if (!empty) g_worst_o = std::max(g_worst_o, std::fabs(got - ref_o));
      const bool ok = empty ? got == 0.0 : std::fabs(got - ref_o) <= kOTol;  // NaN fails both
      if (!ok && bad++ == 0)
        first = "head " + std::to_string(h) + " o[" + std::to_string(d) + "] " + std::to_string(got) + " want " +
                std::to_string(ref_o);
    }
  }
  CHECK_MESSAGE(bad == 0, what << ": " << bad << " elements off; first: " << first);
}

// q of sequence b as the reference reads it.
Bf16View<2> q_of(const std::vector<bf16>& q, const Shape& s, uint32_t b) {
  const size_t n = size_t{s.q_heads} * s.head_dim;
  return Bf16View<2>(std::span<const bf16>(q).subspan(b * n, n), {s.q_heads, s.head_dim});
}

// Random blocks for lists of the given lengths (list l = lengths[l] blocks,
// tail rows random in 1..chunk_tokens), in slots drawn at random from an
// arena with spare slots; checks decode against attend_blocks per sequence.
void check_random_lists(const Shape& s, const std::vector<uint32_t>& lengths, uint32_t max_list_blocks_slack,
                        std::mt19937_64& gen) {
  const uint32_t total = std::accumulate(lengths.begin(), lengths.end(), 0u);
  HostArena arena(s.chunk_tokens, s.head_dim, total + 7);
  std::vector<uint32_t> free_slots(arena.slots);
  std::iota(free_slots.begin(), free_slots.end(), 0u);
  std::shuffle(free_slots.begin(), free_slots.end(), gen);
  Lists lists;
  std::vector<std::vector<ref::BlockKv>> ref_blocks(lengths.size());
  std::uniform_int_distribution<uint32_t> tail_dist(1, s.chunk_tokens);
  for (size_t l = 0; l < lengths.size(); ++l) {
    std::vector<uint32_t> slots(free_slots.end() - lengths[l], free_slots.end());
    free_slots.resize(free_slots.size() - lengths[l]);
    const uint32_t last = tail_dist(gen);
    for (uint32_t i = 0; i < lengths[l]; ++i) {
      const uint32_t tokens = i + 1 == lengths[l] ? last : s.chunk_tokens;
      const size_t n = size_t{tokens} * s.head_dim;
      const std::vector<bf16> k = test::random_bf16(n, gen), v = test::random_bf16(n, gen);
      std::copy(k.begin(), k.end(), arena.k(slots[i]));
      std::copy(v.begin(), v.end(), arena.v(slots[i]));
      ref_blocks[l].push_back(arena.block(slots[i], tokens));
    }
    lists.add(slots, last);
  }
  const std::vector<bf16> q = test::random_bf16(s.rows() * s.head_dim, gen, -2.f, 2.f);
  const double scale = ref::default_scale(s.head_dim);
  const GpuState got = run_decode(s, arena, q, lists, static_cast<float>(scale), lists.max_blocks + max_list_blocks_slack);
  for (uint32_t b = 0; b < s.batch; ++b) {
    const std::vector<std::vector<ref::BlockKv>> mine(ref_blocks.begin() + b * s.kv_heads,
                                                      ref_blocks.begin() + (b + 1) * s.kv_heads);
    const PartialState64 want = ref::attend_blocks(q_of(q, s, b), mine, scale);
    check_state(got.o, got.lse, size_t{b} * s.q_heads, want, s.str() + " sequence " + std::to_string(b));
  }
}

// One sequence's K and V as the reference's LayerKv ([kv_heads][tokens][D]).
struct Context {
  uint64_t tokens = 0;
  std::vector<bf16> k, v;
  ref::LayerKv view(const Shape& s) const {
    const std::array<size_t, 3> shape{s.kv_heads, static_cast<size_t>(tokens), s.head_dim};
    return {Bf16View<3>(std::span<const bf16>(k), shape), Bf16View<3>(std::span<const bf16>(v), shape)};
  }
};

uint32_t chunks_of(const Shape& s, uint64_t tokens) {
  return static_cast<uint32_t>((tokens + s.chunk_tokens - 1) / s.chunk_tokens);
}

// Copies chunk c of KV head h of ctx into `slot`; returns its token count.
uint32_t store_chunk(const Shape& s, const Context& ctx, uint32_t h, uint32_t c, uint32_t slot, HostArena& arena) {
  const uint64_t first = uint64_t{c} * s.chunk_tokens;
  const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(s.chunk_tokens, ctx.tokens - first));
  const size_t src = (h * ctx.tokens + first) * s.head_dim, elems = size_t{n} * s.head_dim;
  std::copy_n(ctx.k.begin() + src, elems, arena.k(slot));
  std::copy_n(ctx.v.begin() + src, elems, arena.v(slot));
  return n;
}

// Lists the chunks of (sequence, KV head) that `on_gpu` picks, in random
// order except that a partly filled last chunk goes last, as DecodeArgs
// requires; stores them in fresh slots.
void list_chunks(const Shape& s, const Context& ctx, uint32_t h, const std::vector<bool>& on_gpu,
                 std::vector<uint32_t>& free_slots, HostArena& arena, Lists& lists, std::mt19937_64& gen) {
  std::vector<uint32_t> chunks;
  for (uint32_t c = 0; c < on_gpu.size(); ++c)
    if (on_gpu[c]) chunks.push_back(c);
  std::shuffle(chunks.begin(), chunks.end(), gen);
  const uint32_t tail = chunks_of(s, ctx.tokens) - 1;
  const auto it = std::find(chunks.begin(), chunks.end(), tail);
  if (it != chunks.end()) std::iter_swap(it, chunks.end() - 1);
  std::vector<uint32_t> slots;
  uint32_t last = s.chunk_tokens;
  for (uint32_t c : chunks) {
    slots.push_back(free_slots.back());
    free_slots.pop_back();
    last = store_chunk(s, ctx, h, c, slots.back(), arena);
  }
  lists.add(slots, chunks.empty() ? 1 : last);
}

Context random_context(const Shape& s, uint64_t tokens, std::mt19937_64& gen) {
  const size_t n = s.kv_heads * tokens * s.head_dim;
  return {tokens, test::random_bf16(n, gen), test::random_bf16(n, gen)};
}

std::vector<uint32_t> shuffled_slots(uint32_t n, std::mt19937_64& gen) {
  std::vector<uint32_t> slots(n);
  std::iota(slots.begin(), slots.end(), 0u);
  std::shuffle(slots.begin(), slots.end(), gen);
  return slots;
}

// A PartialState64 as fp32 rows [heads][D] appended to a parts array.
void append_state(const PartialState64& st, std::vector<float>& o, std::vector<float>& lse) {
  for (double x : st.o) o.push_back(static_cast<float>(x));
  for (double x : st.lse) lse.push_back(static_cast<float>(x));
}

}  // namespace

TEST_CASE("decode matches the fp64 reference for every head dim, group and chunk size") {
  cuda_context_or_skip();
  auto gen = test::rng(1);
  const std::vector<uint32_t> chunk_sizes =
      test::quick_sweep() ? std::vector<uint32_t>{16, 64, 256} : std::vector<uint32_t>{16, 32, 64, 128, 256};
  for (uint32_t head_dim : {64u, 128u}) {
    for (uint32_t group : {1u, 2u, 4u, 8u}) {
      for (uint32_t chunk : chunk_sizes) {
        // batch 3 x 2 KV heads: six lists of 0, 1, 17 and 97 blocks and two
        // others, shuffled so each length meets several split positions.
        const Shape s{3, 2 * group, 2, head_dim, chunk};
        std::vector<uint32_t> lengths = {0, 1, 17, 97, 5, 33};
        if (test::quick_sweep() && chunk == 256) lengths = {0, 1, 17, 40, 5, 9};
        std::shuffle(lengths.begin(), lengths.end(), gen);
        check_random_lists(s, lengths, chunk % 3, gen);
      }
    }
  }
}

TEST_CASE("the split plan: about one CTA per SM, no empty split") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const auto gpus = gpu::list_gpus();
  REQUIRE_MESSAGE(gpus.ok(), gpus.status().to_string());
  const gpu::GpuDevice& dev = gpus->at(static_cast<size_t>(ctx.device()));
  // Llama-3.1-8B decode: 8 KV heads, groups of 4, 130 blocks of 64 tokens per list.
  gpu::DecodeArgs a;
  a.q_heads = 32;
  a.kv_heads = 8;
  a.arena = {reinterpret_cast<std::byte*>(uintptr_t{256}), 64 * 128 * 4, 1 << 16, 64, 128};
  a.max_list_blocks = 130;
  a.scale = 0.088f;
  for (uint32_t batch : {1u, 4u, 16u, 64u}) {
    a.batch = batch;
    const auto plan = gpu::decode_launch_plan(a);
    REQUIRE_MESSAGE(plan.ok(), plan.status().to_string());
    const uint64_t lists = uint64_t{batch} * a.kv_heads, ctas = plan->splits * lists;
    MESSAGE("batch ", batch, ": ", plan->splits, " splits of ", plan->blocks_per_split, " blocks, ", ctas, " CTAs on ",
            dev.sm_count, " SMs");
    CHECK(uint64_t{plan->splits} * plan->blocks_per_split >= a.max_list_blocks);
    CHECK(uint64_t{plan->splits - 1} * plan->blocks_per_split < a.max_list_blocks);
    CHECK((ctas <= dev.sm_count || plan->splits == 1));
    if (lists * 2 <= dev.sm_count) CHECK(ctas * 2 > dev.sm_count);  // more than half the SMs busy
    CHECK((plan->splits > 1) == (plan->workspace_bytes > 0));
    CHECK(plan->workspace_bytes == gpu::decode_workspace_bytes(a));
  }
}

TEST_CASE("lists longer than the SMs can split evenly: splits of at most 256 blocks") {
  cuda_context_or_skip();
  auto gen = test::rng(6);
  // 4200 blocks in splits of at most 256 blocks (a split's slot table).
  check_random_lists(Shape{1, 2, 1, 64, 16}, {4200}, 0, gen);
  check_random_lists(Shape{2, 8, 2, 128, 16}, {4100, 3, 0, 4099}, 1, gen);
}

TEST_CASE("decode of a single sequence and a single list, one block or many") {
  cuda_context_or_skip();
  auto gen = test::rng(2);
  for (uint32_t blocks : {1u, 17u, 97u}) {
    check_random_lists(Shape{1, 4, 1, 128, 64}, {blocks}, 0, gen);
    check_random_lists(Shape{1, 8, 1, 64, 16}, {blocks}, 0, gen);
  }
}

TEST_CASE("decode with only empty lists writes the empty state") {
  cuda_context_or_skip();
  auto gen = test::rng(3);
  check_random_lists(Shape{2, 8, 2, 128, 64}, {0, 0, 0, 0}, 0, gen);  // max_list_blocks = 0
  check_random_lists(Shape{2, 8, 2, 128, 64}, {0, 0, 0, 0}, 5, gen);  // an upper bound with no blocks
}

TEST_CASE("decode over every block of a context equals dense attention (batch 17, different lengths)") {
  cuda_context_or_skip();
  auto gen = test::rng(4);
  const Shape s{17, 32, 8, 128, 64};
  const uint64_t max_tokens = test::quick_sweep() ? 700 : 2000;
  std::uniform_int_distribution<uint64_t> len(1, max_tokens);
  std::vector<Context> seqs;
  uint32_t blocks = 0;
  for (uint32_t b = 0; b < s.batch; ++b) {
    // One sequence ends exactly on a chunk boundary: its last block is full.
    const uint64_t tokens = b == 5 ? 12 * s.chunk_tokens : len(gen);
    seqs.push_back(random_context(s, tokens, gen));
    blocks += s.kv_heads * chunks_of(s, tokens);
  }
  HostArena arena(s.chunk_tokens, s.head_dim, blocks + 3);
  std::vector<uint32_t> free_slots = shuffled_slots(arena.slots, gen);
  Lists lists;
  for (uint32_t b = 0; b < s.batch; ++b)
    for (uint32_t h = 0; h < s.kv_heads; ++h)
      list_chunks(s, seqs[b], h, std::vector<bool>(chunks_of(s, seqs[b].tokens), true), free_slots, arena, lists, gen);
  const std::vector<bf16> q = test::random_bf16(s.rows() * s.head_dim, gen, -2.f, 2.f);
  const double scale = ref::default_scale(s.head_dim);
  const GpuState got = run_decode(s, arena, q, lists, static_cast<float>(scale), lists.max_blocks);
  for (uint32_t b = 0; b < s.batch; ++b) {
    const PartialState64 want = ref::dense_attention(q_of(q, s, b), seqs[b].view(s), scale);
    check_state(got.o, got.lse, size_t{b} * s.q_heads, want, "dense, sequence " + std::to_string(b));
  }
}

TEST_CASE("a GPU partial merged with CPU partials equals dense attention over the union") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  auto gen = test::rng(5);
  const Shape s{2, 16, 4, 128, 32};
  std::vector<Context> seqs = {random_context(s, 1500, gen), random_context(s, 777, gen)};
  HostArena arena(s.chunk_tokens, s.head_dim, s.kv_heads * (chunks_of(s, 1500) + chunks_of(s, 777)));
  std::vector<uint32_t> free_slots = shuffled_slots(arena.slots, gen);
  Lists lists;
  std::vector<std::vector<std::vector<uint32_t>>> cpu_chunks(s.batch, std::vector<std::vector<uint32_t>>(s.kv_heads));
  std::bernoulli_distribution coin(0.5);
  for (uint32_t b = 0; b < s.batch; ++b) {
    for (uint32_t h = 0; h < s.kv_heads; ++h) {
      // KV head 0: all chunks on the GPU; head 1: none; the others: a coin each.
      std::vector<bool> on_gpu(chunks_of(s, seqs[b].tokens));
      for (uint32_t c = 0; c < on_gpu.size(); ++c) {
        on_gpu[c] = h == 0 || (h != 1 && coin(gen));
        if (!on_gpu[c]) cpu_chunks[b][h].push_back(c);
      }
      list_chunks(s, seqs[b], h, on_gpu, free_slots, arena, lists, gen);
    }
  }
  const std::vector<bf16> q = test::random_bf16(s.rows() * s.head_dim, gen, -2.f, 2.f);
  const double scale = ref::default_scale(s.head_dim);
  GpuState gpu_part = run_decode(s, arena, q, lists, static_cast<float>(scale), lists.max_blocks);

  // Parts: the GPU's, the CPU's (fp64 reference rounded to fp32), and an
  // empty one, stacked as merge_partials reads them.
  std::vector<float> parts_o = gpu_part.o, parts_lse = gpu_part.lse;
  for (uint32_t b = 0; b < s.batch; ++b)
    append_state(ref::attend_blocks(q_of(q, s, b), ref::blocks_of(seqs[b].view(s), s.chunk_tokens, cpu_chunks[b]), scale),
                 parts_o, parts_lse);
  // The empty part's o is NaN: an empty state weighs nothing, whatever its o holds.
  parts_o.resize(parts_o.size() + s.rows() * s.head_dim, std::numeric_limits<float>::quiet_NaN());
  parts_lse.resize(parts_lse.size() + s.rows(), -kInf);
  DeviceBuffer<float> d_parts_o(ctx, parts_o), d_parts_lse(ctx, parts_lse);
  DeviceBuffer<float> d_o(ctx, s.rows() * s.head_dim), d_lse(ctx, s.rows());
  DeviceBuffer<bf16> d_bf16(ctx, s.rows() * s.head_dim);
  d_o.poison();
  d_lse.poison();
  d_bf16.poison();
  const gpu::MergeArgs m{d_parts_o.get(), d_parts_lse.get(), 3, static_cast<uint32_t>(s.rows()), s.head_dim,
                         d_o.get(), d_lse.get(), d_bf16.get()};
  require_ok(gpu::merge_partials(m, ctx.compute_stream()));
  test::sync_or_fail(ctx);
  const std::vector<float> o = d_o.download(), lse = d_lse.download();
  for (uint32_t b = 0; b < s.batch; ++b) {
    const PartialState64 want = ref::dense_attention(q_of(q, s, b), seqs[b].view(s), scale);
    check_state(o, lse, size_t{b} * s.q_heads, want, "merged, sequence " + std::to_string(b));
  }
  // The bf16 output is o rounded to nearest even, bit for bit.
  const std::vector<bf16> o_bf16 = d_bf16.download();
  size_t bad = 0;
  for (size_t i = 0; i < o.size(); ++i) bad += o_bf16[i] == bf16::from_float(o[i]) ? 0 : 1;
  CHECK_MESSAGE(bad == 0, bad << " bf16 outputs differ from o rounded to nearest even");
}

TEST_CASE("merging only empty parts gives the empty state, never NaN") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const uint32_t parts = 3, rows = 5, dim = 64;
  // Rows 0..3 are empty in every part; row 4 has one non-empty part.
  // Empty parts' o is NaN: the merge must not read it into anything.
  std::vector<float> o(size_t{parts} * rows * dim, std::numeric_limits<float>::quiet_NaN()), lse(size_t{parts} * rows, -kInf);
  for (uint32_t d = 0; d < dim; ++d) o[(size_t{1} * rows + 4) * dim + d] = 0.25f * d;
  lse[1 * rows + 4] = 3.5f;
  DeviceBuffer<float> d_o_parts(ctx, o), d_lse_parts(ctx, lse);
  DeviceBuffer<float> d_o(ctx, size_t{rows} * dim), d_lse(ctx, rows);
  DeviceBuffer<bf16> d_bf16(ctx, size_t{rows} * dim);
  d_o.poison();
  d_lse.poison();
  d_bf16.poison();
  require_ok(gpu::merge_partials({d_o_parts.get(), d_lse_parts.get(), parts, rows, dim, d_o.get(), d_lse.get(), d_bf16.get()},
                                 ctx.compute_stream()));
  test::sync_or_fail(ctx);
  const std::vector<float> got_o = d_o.download(), got_lse = d_lse.download();
  const std::vector<bf16> got_bf16 = d_bf16.download();
  for (uint32_t r = 0; r < rows; ++r) {
    CHECK(got_lse[r] == (r == 4 ? 3.5f : -kInf));
    for (uint32_t d = 0; d < dim; ++d) {
      const float want = r == 4 ? 0.25f * d : 0.f;  // a single part merges to itself exactly
      CHECK(got_o[size_t{r} * dim + d] == want);
      CHECK(got_bf16[size_t{r} * dim + d] == bf16::from_float(want));
    }
  }
}

TEST_CASE("bad arguments are invalid_argument errors that name the field") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  DeviceBuffer<bf16> q(ctx, 8 * 128), arena(ctx, 4 * 64 * 128 * 4);
  DeviceBuffer<uint32_t> begin(ctx, std::vector<uint32_t>{0, 1, 2}), slots(ctx, std::vector<uint32_t>{0, 1}),
      last(ctx, std::vector<uint32_t>{64, 64});
  DeviceBuffer<float> o(ctx, 8 * 128), lse(ctx, 8);
  gpu::DecodeArgs good;
  good.q = q.get();
  good.batch = 1;
  good.q_heads = 8;
  good.kv_heads = 2;
  good.arena = {reinterpret_cast<std::byte*>(arena.get()), 64 * 128 * 4, 4, 64, 128};
  good.list_begin = begin.get();
  good.slot_ids = slots.get();
  good.last_tokens = last.get();
  good.max_list_blocks = 1;
  good.scale = 0.088f;
  good.o = o.get();
  good.lse = lse.get();
  const auto expect_invalid = [&](gpu::DecodeArgs a, const std::string& field, uint64_t ws_bytes = 1u << 20) {
    DeviceBuffer<std::byte> ws(ctx, ws_bytes);
    const Status st = gpu::decode_attention(a, ws.get(), ws_bytes, ctx.compute_stream());
    CHECK_MESSAGE(st.code() == StatusCode::kInvalidArgument, field << ": " << st.to_string());
    CHECK_MESSAGE(st.message().find(field) != std::string::npos, st.message());
  };
  {
    gpu::DecodeArgs a = good;
    a.q = nullptr;
    expect_invalid(a, "q");
  }
  {
    gpu::DecodeArgs a = good;
    a.slot_ids = nullptr;
    expect_invalid(a, "slot_ids");
  }
  {
    gpu::DecodeArgs a = good;
    a.arena.head_dim = 96;
    expect_invalid(a, "head_dim=96");
  }
  {
    gpu::DecodeArgs a = good;
    a.arena.chunk_tokens = 48;
    expect_invalid(a, "chunk_tokens=48");
  }
  {
    gpu::DecodeArgs a = good;
    a.q_heads = 6;
    a.kv_heads = 2;  // group 3
    expect_invalid(a, "q_heads / kv_heads=3");
  }
  {
    gpu::DecodeArgs a = good;
    a.q_heads = 7;
    expect_invalid(a, "q_heads=7");
  }
  {
    gpu::DecodeArgs a = good;
    a.arena.slot_bytes = 1000;
    expect_invalid(a, "slot_bytes=1000");
  }
  {
    gpu::DecodeArgs a = good;
    a.batch = 0;
    expect_invalid(a, "batch=0");
  }
  {
    // A list long enough to need splits needs a workspace.
    gpu::DecodeArgs a = good;
    a.max_list_blocks = 4000;
    REQUIRE(gpu::decode_workspace_bytes(a) > 0);
    expect_invalid(a, "workspace_bytes", gpu::decode_workspace_bytes(a) - 4);
  }
  const gpu::MergeArgs merge_good{o.get(), lse.get(), 1, 8, 128, nullptr, nullptr, nullptr};
  {
    gpu::MergeArgs m = merge_good;
    m.parts = 0;
    DeviceBuffer<float> out(ctx, 8 * 128);
    m.o_out = out.get();
    const Status st = gpu::merge_partials(m, ctx.compute_stream());
    CHECK(st.code() == StatusCode::kInvalidArgument);
    CHECK(st.message().find("parts=0") != std::string::npos);
  }
  {
    gpu::MergeArgs m = merge_good;
    m.o_out = o.get();  // aliases o_parts
    CHECK(gpu::merge_partials(m, ctx.compute_stream()).code() == StatusCode::kInvalidArgument);
  }
  test::sync_or_fail(ctx);
}

// Last in the file, so it runs last: the margins the tolerances above leave.
TEST_CASE("worst errors against the fp64 reference (printed)") {
  MESSAGE("worst |o - ref| ", g_worst_o, " (bound ", kOTol, "), worst |lse - ref| ", g_worst_lse, " (bound ", kLseTol,
          ")");
  CHECK(g_worst_o <= kOTol);
}
