// The executor's CUDA side: per-step uploads through pinned staging, the
// append and decode kernels, downloads of the partial states, and prefill.
#include <algorithm>
#include <cstring>

#include "executor_internal.h"

namespace kvtier::scheduler {

using detail::at;
using detail::Packer;

namespace {

// Device memory of at least `bytes` (grown by reallocation; contents not kept).
Status ensure(gpu::CudaContext& ctx, DeviceMemory& m, uint64_t bytes) {
  if (m.bytes() >= bytes) return Status::ok_status();
  m = DeviceMemory();
  KVT_ASSIGN_OR_RETURN(m, ctx.allocate(std::max<uint64_t>(bytes + bytes / 2, 4096)));
  return Status::ok_status();
}

}  // namespace

Status Executor::Gpu::init(gpu::CudaContext& context) {
  ctx = &context;
  KVT_ASSIGN_OR_RETURN(origin, gpu::Event::create());
  for (int i = 0; i < 2; ++i) {
    KVT_ASSIGN_OR_RETURN(start[i], gpu::Event::create());
    KVT_ASSIGN_OR_RETURN(stop[i], gpu::Event::create());
  }
  KVT_ASSIGN_OR_RETURN(scored, gpu::Event::create());
  return Status::ok_status();
}

Status Executor::Gpu::begin_step(std::span<const DecodeItem> batch, uint32_t q_heads, uint32_t kv_heads,
                                 uint32_t head_dim, std::span<const uint32_t> tail_slots,
                                 std::span<const uint32_t> rows) {
  const uint32_t B = static_cast<uint32_t>(batch.size());
  const size_t qrow = size_t{q_heads} * head_dim, kvrow = size_t{kv_heads} * head_dim;
  Packer pk;
  in_off_q = pk.add<bf16>(B * qrow);
  in_off_k = pk.add<bf16>(B * kvrow);
  in_off_v = pk.add<bf16>(B * kvrow);
  in_off_slots = pk.add<uint32_t>(tail_slots.size());
  in_off_rows = pk.add<uint32_t>(rows.size());
  KVT_RETURN_IF_ERROR(host_in.reserve(pk.bytes()));
  KVT_RETURN_IF_ERROR(ensure(*ctx, dev_in, pk.bytes()));
  std::byte* h = host_in.data();
  for (uint32_t b = 0; b < B; ++b) {
    std::memcpy(at<bf16>(h, in_off_q) + b * qrow, batch[b].q.data(), qrow * sizeof(bf16));
    std::memcpy(at<bf16>(h, in_off_k) + b * kvrow, batch[b].k.data(), kvrow * sizeof(bf16));
    std::memcpy(at<bf16>(h, in_off_v) + b * kvrow, batch[b].v.data(), kvrow * sizeof(bf16));
  }
  std::memcpy(at<uint32_t>(h, in_off_slots), tail_slots.data(), tail_slots.size_bytes());
  std::memcpy(at<uint32_t>(h, in_off_rows), rows.data(), rows.size_bytes());
  // Outputs of both parts.
  Packer po;
  for (int p = 0; p < 2; ++p) {
    out_off[p][0] = po.add<float>(B * qrow);
    out_off[p][1] = po.add<float>(size_t{B} * q_heads);
  }
  out_bytes = po.bytes();
  KVT_RETURN_IF_ERROR(host_out.reserve(out_bytes));
  KVT_RETURN_IF_ERROR(ensure(*ctx, dev_out, out_bytes));
  used[0] = used[1] = false;
  const cudaStream_t st = ctx->compute_stream();
  KVT_RETURN_IF_ERROR(origin.record(st));
  KVT_RETURN_IF_ERROR(ctx->copy_async(dev_in.data(), h, pk.bytes(), st));
  return Status::ok_status();
}

Status Executor::Gpu::attend(int part, const SlotLists& lists, uint32_t batch, uint32_t q_heads, uint32_t kv_heads,
                             const gpu::SlotArenaView& arena, float scale) {
  KVT_RETURN_IF_ERROR(ctx->make_current());  // the flow graph may run this on any of its threads
  const cudaStream_t st = ctx->compute_stream();
  Packer pk;
  list_off[part][0] = pk.add<uint32_t>(lists.begin.size());
  list_off[part][1] = pk.add<uint32_t>(std::max<size_t>(lists.slots.size(), 1));
  list_off[part][2] = pk.add<uint32_t>(lists.last.size());
  KVT_RETURN_IF_ERROR(host_list[part].reserve(pk.bytes()));
  KVT_RETURN_IF_ERROR(ensure(*ctx, dev_list[part], pk.bytes()));
  std::byte* h = host_list[part].data();
  std::memcpy(at<uint32_t>(h, list_off[part][0]), lists.begin.data(), lists.begin.size() * 4);
  std::memcpy(at<uint32_t>(h, list_off[part][1]), lists.slots.data(), lists.slots.size() * 4);
  std::memcpy(at<uint32_t>(h, list_off[part][2]), lists.last.data(), lists.last.size() * 4);
  KVT_RETURN_IF_ERROR(ctx->copy_async(dev_list[part].data(), h, pk.bytes(), st));
  std::byte* d = dev_list[part].data();
  gpu::DecodeArgs a;
  a.q = at<const bf16>(dev_in.data(), in_off_q);
  a.batch = batch;
  a.q_heads = q_heads;
  a.kv_heads = kv_heads;
  a.arena = arena;
  a.list_begin = at<const uint32_t>(d, list_off[part][0]);
  a.slot_ids = at<const uint32_t>(d, list_off[part][1]);
  a.last_tokens = at<const uint32_t>(d, list_off[part][2]);
  a.max_list_blocks = std::max<uint32_t>(lists.longest, 1);
  a.scale = scale;
  a.o = at<float>(dev_out.data(), out_off[part][0]);
  a.lse = at<float>(dev_out.data(), out_off[part][1]);
  const uint64_t ws = gpu::decode_workspace_bytes(a);
  KVT_RETURN_IF_ERROR(ensure(*ctx, workspace, ws));
  KVT_RETURN_IF_ERROR(start[part].record(st));
  KVT_RETURN_IF_ERROR(gpu::decode_attention(a, workspace.data(), workspace.bytes(), st));
  KVT_RETURN_IF_ERROR(stop[part].record(st));
  const uint64_t o_bytes = out_off[part][1] - out_off[part][0];
  const uint64_t lse_bytes = uint64_t{batch} * q_heads * sizeof(float);
  KVT_RETURN_IF_ERROR(ctx->copy_async(host_out.data() + out_off[part][0], dev_out.data() + out_off[part][0],
                                      o_bytes + lse_bytes, st));
  used[part] = true;
  return Status::ok_status();
}

Status Executor::Gpu::score(std::span<const ScoreJob> jobs, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                            float scale) {
  if (jobs.empty()) return Status::ok_status();
  uint64_t floats = 0;
  for (const ScoreJob& j : jobs) floats = std::max(floats, j.offset + uint64_t{kv_heads} * j.far_end);
  KVT_RETURN_IF_ERROR(host_scores.reserve(floats * sizeof(float)));
  KVT_RETURN_IF_ERROR(ensure(*ctx, dev_scores, floats * sizeof(float)));
  const cudaStream_t st = ctx->compute_stream();
  float* dev = at<float>(dev_scores.data(), 0);
  for (const ScoreJob& j : jobs) {
    gpu::ScoreArgs a;
    a.q = at<const bf16>(dev_in.data(), in_off_q) + size_t{j.b} * q_heads * head_dim;
    a.q_heads = q_heads;
    a.kv_heads = kv_heads;
    a.head_dim = head_dim;
    a.kmean = j.kmean;
    a.kmean_f32 = j.f32;
    a.row_stride = j.row_stride;
    a.head_rows = j.head_rows;
    a.block_begin = j.far_begin;
    a.block_end = j.far_end;
    a.scale = scale;
    a.scores = dev + j.offset;
    a.scores_stride = j.far_end;
    KVT_RETURN_IF_ERROR(gpu::score_summaries(a, st));
  }
  KVT_RETURN_IF_ERROR(ctx->copy_async(host_scores.data(), dev_scores.data(), floats * sizeof(float), st));
  return scored.record(st);
}

Status Executor::Gpu::finish() { return ctx->synchronize(ctx->compute_stream()); }

Result<std::pair<float, float>> Executor::Gpu::part_span_ms(int part) const {
  if (!used[part]) return std::pair<float, float>{0.f, 0.f};
  KVT_ASSIGN_OR_RETURN(const float begin, gpu::Event::elapsed_ms(origin, start[part]));
  KVT_ASSIGN_OR_RETURN(const float end, gpu::Event::elapsed_ms(origin, stop[part]));
  return std::pair<float, float>{begin, end};
}

Status Executor::Gpu::upload_tail(const bf16* host_block, uint32_t slot, const gpu::SlotArenaView& arena,
                                  uint32_t rows, uint32_t head_dim) {
  // K rows then V rows: two copies into the slot's K and V halves.
  std::byte* dst = arena.base + uint64_t{slot} * arena.slot_bytes;
  const uint64_t half = uint64_t{arena.chunk_tokens} * head_dim * sizeof(bf16);
  const uint64_t bytes = uint64_t{rows} * head_dim * sizeof(bf16);
  KVT_RETURN_IF_ERROR(ctx->upload(dst, host_block, bytes));
  return ctx->upload(dst + half, host_block + uint64_t{arena.chunk_tokens} * head_dim, bytes);
}

Status Executor::Gpu::prefill(Executor& ex, SequenceKv& seq, uint32_t layer, uint64_t first_token, uint32_t n,
                              std::span<const bf16> q_pinned, const std::vector<std::vector<uint32_t>>& full,
                              const std::vector<std::vector<storage::BlockPin>>& pins, bool tail_partial,
                              uint32_t last_chunk, float scale, float* o_host, float* lse_host) {
  const ModelShape& s = ex.options_.shape;
  const uint32_t C = ex.options_.policy.chunk_tokens, d = s.head_dim, kvh = s.kv_heads, qh = s.q_heads;
  const gpu::SlotArenaView arena{ex.arena_->slot_data(0), ex.arena_->slot_bytes(), ex.arena_->capacity(), C, d};
  const uint64_t tokens = first_token + n;
  // The tail's device copy (the block's own partial chunk).
  std::vector<uint32_t> tail_slot(kvh);
  for (uint32_t h = 0; h < kvh; ++h) {
    tail_slot[h] = seq.tail_slots_[layer * kvh + h];
    if (tail_partial)
      KVT_RETURN_IF_ERROR(upload_tail(seq.tail(layer, h), tail_slot[h], arena, static_cast<uint32_t>(tokens % C), d));
  }
  // Lists per head with absolute positions.
  std::vector<uint32_t> begin{0}, slots, btok;
  std::vector<uint64_t> bpos;
  for (uint32_t h = 0; h < kvh; ++h) {
    for (size_t j = 0; j < full[h].size(); ++j) {
      slots.push_back(ex.slot_of(pins[h][j].data()));
      bpos.push_back(uint64_t{full[h][j]} * C);
      btok.push_back(C);
    }
    if (tail_partial) {
      slots.push_back(tail_slot[h]);
      bpos.push_back(uint64_t{last_chunk} * C);
      btok.push_back(static_cast<uint32_t>(tokens % C));
    }
    begin.push_back(static_cast<uint32_t>(slots.size()));
  }
  const size_t qrow = size_t{qh} * d;
  Packer pk;
  const uint64_t off_begin = pk.add<uint32_t>(begin.size());
  const uint64_t off_slots = pk.add<uint32_t>(std::max<size_t>(slots.size(), 1));
  const uint64_t off_pos = pk.add<uint64_t>(std::max<size_t>(bpos.size(), 1));
  const uint64_t off_tok = pk.add<uint32_t>(std::max<size_t>(btok.size(), 1));
  const uint64_t in_bytes = pk.bytes();
  const uint64_t off_o = pk.add<float>(size_t{n} * qrow);
  const uint64_t off_lse = pk.add<float>(size_t{n} * qh);
  KVT_RETURN_IF_ERROR(host_big.reserve(pk.bytes()));
  KVT_RETURN_IF_ERROR(ensure(*ctx, dev_big, pk.bytes()));
  std::byte* h = host_big.data();
  std::memcpy(at<uint32_t>(h, off_begin), begin.data(), begin.size() * 4);
  std::memcpy(at<uint32_t>(h, off_slots), slots.data(), slots.size() * 4);
  std::memcpy(at<uint64_t>(h, off_pos), bpos.data(), bpos.size() * 8);
  std::memcpy(at<uint32_t>(h, off_tok), btok.data(), btok.size() * 4);
  const cudaStream_t st = ctx->compute_stream();
  KVT_RETURN_IF_ERROR(ensure(*ctx, dev_q, q_pinned.size_bytes()));
  KVT_RETURN_IF_ERROR(ctx->copy_async(dev_q.data(), q_pinned.data(), q_pinned.size_bytes(), st));
  KVT_RETURN_IF_ERROR(ctx->copy_async(dev_big.data(), h, in_bytes, st));
  std::byte* dv = dev_big.data();
  gpu::PrefillArgs a;
  a.q = reinterpret_cast<const bf16*>(dev_q.data());
  a.nq = n;
  a.q_heads = qh;
  a.kv_heads = kvh;
  a.q_first_pos = first_token;
  a.arena = arena;
  a.list_begin = at<const uint32_t>(dv, off_begin);
  a.slot_ids = at<const uint32_t>(dv, off_slots);
  a.block_first_pos = at<const uint64_t>(dv, off_pos);
  a.block_tokens = at<const uint32_t>(dv, off_tok);
  a.scale = scale;
  a.o = at<float>(dv, off_o);
  a.lse = at<float>(dv, off_lse);
  const double t0 = detail::wall_us();
  KVT_RETURN_IF_ERROR(gpu::prefill_attention(a, st));
  if (o_host != nullptr) {
    KVT_RETURN_IF_ERROR(ctx->copy_async(o_host, a.o, size_t{n} * qrow * sizeof(float), st));
    KVT_RETURN_IF_ERROR(ctx->copy_async(lse_host, a.lse, size_t{n} * qh * sizeof(float), st));
  }
  KVT_RETURN_IF_ERROR(ctx->synchronize(st));
  if (ex.options_.trace != nullptr)
    ex.options_.trace->complete(ex.lane_gpu_, "prefill attention", ex.options_.trace->now_us() - (detail::wall_us() - t0),
                                detail::wall_us() - t0);
  return Status::ok_status();
}

}  // namespace kvtier::scheduler
