// Saved sequences: the blocks are in the NVMe file (BlockFile, checksummed
// per block); what else a later process needs -- shape and policy, token
// counts per layer, the summaries of written blocks and the tail blocks --
// goes to `<file>.meta`, written to a temporary name and renamed into place,
// with a CRC32C over everything after the header.
//
// Layout (little-endian): "KVTSEQ01", u32 header_bytes, then the header:
// u32 layers, q_heads, kv_heads, head_dim, u64 sink, window, u32 chunk, topk,
// u8 summary_kind, far_field, u64 max_tokens, u64 tokens[layers]; then u32 crc
// of the payload, u64 payload_bytes, and the payload: per layer, per KV head,
// per full chunk: mean key row (fp32 head_dim or bf16 head_dim), min and max
// rows (min/max kind), mean value row, u32 tokens; then the tails.
#include <cstring>
#include <fstream>

#include "executor_internal.h"
#include "kvtier/storage/block_file.h"
#include "kvtier/storage/crc32c.h"

namespace kvtier::scheduler {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'T', 'S', 'E', 'Q', '0', '1'};

struct Header {
  uint32_t layers, q_heads, kv_heads, head_dim;
  uint64_t sink, window;
  uint32_t chunk, topk;
  uint8_t summary_kind, far_field, pad[6];
  uint64_t max_tokens;
};

class Writer {
 public:
  void put(const void* p, size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    buf_.insert(buf_.end(), b, b + n);
  }
  template <class T>
  void put(const T& v) {
    put(&v, sizeof(T));
  }
  const std::vector<std::byte>& bytes() const { return buf_; }

 private:
  std::vector<std::byte> buf_;
};

class Reader {
 public:
  Reader(const std::vector<std::byte>& b, std::string name) : buf_(b), name_(std::move(name)) {}
  Status get(void* p, size_t n) {
    if (pos_ + n > buf_.size()) return corrupt(name_ + " is truncated at byte " + std::to_string(pos_));
    std::memcpy(p, buf_.data() + pos_, n);
    pos_ += n;
    return Status::ok_status();
  }
  template <class T>
  Status get(T& v) {
    return get(&v, sizeof(T));
  }

 private:
  const std::vector<std::byte>& buf_;
  std::string name_;
  size_t pos_ = 0;
};

Header header_of(const ModelShape& s, const SparsityPolicy& p, uint64_t max_tokens) {
  Header h{};
  h.layers = s.layers;
  h.q_heads = s.q_heads;
  h.kv_heads = s.kv_heads;
  h.head_dim = s.head_dim;
  h.sink = p.sink_tokens;
  h.window = p.window_tokens;
  h.chunk = p.chunk_tokens;
  h.topk = p.topk_chunks;
  h.summary_kind = static_cast<uint8_t>(p.summary_kind);
  h.far_field = static_cast<uint8_t>(p.far_field);
  h.max_tokens = max_tokens;
  return h;
}

std::string describe_header(const Header& h) {
  return "layers=" + std::to_string(h.layers) + " q_heads=" + std::to_string(h.q_heads) +
         " kv_heads=" + std::to_string(h.kv_heads) + " head_dim=" + std::to_string(h.head_dim) +
         " sink_tokens=" + std::to_string(h.sink) + " window_tokens=" + std::to_string(h.window) +
         " chunk_tokens=" + std::to_string(h.chunk) + " summary=" + std::to_string(h.summary_kind);
}

// The summary rows of one block, in or out.
template <class Io, class Table>
Status rows(Io& io, Table& t, uint32_t h, uint32_t b) {
  const uint32_t d = t.head_dim();
  auto f = [&](auto* p, size_t n) -> Status {
    if constexpr (std::is_same_v<Io, Writer>) {
      io.put(p, n);
      return Status::ok_status();
    } else {
      return io.get(p, n);
    }
  };
  if (t.kind() == SummaryKind::kMeanBf16) {
    KVT_RETURN_IF_ERROR(f(t.kmean_bf16(h, b), d * sizeof(bf16)));
  } else {
    KVT_RETURN_IF_ERROR(f(t.kmean_f32(h, b), d * sizeof(float)));
  }
  if (t.kind() == SummaryKind::kMinMaxF32) {
    KVT_RETURN_IF_ERROR(f(t.kmin(h, b), d * sizeof(float)));
    KVT_RETURN_IF_ERROR(f(t.kmax(h, b), d * sizeof(float)));
  }
  KVT_RETURN_IF_ERROR(f(t.vmean(h, b), d * sizeof(float)));
  return f(&t.tokens(b), sizeof(uint32_t));
}

}  // namespace

Status Executor::save_sequence(SequenceKv& seq, const std::filesystem::path& path) {
  const ModelShape& s = options_.shape;
  const uint32_t C = options_.policy.chunk_tokens;
  KVT_RETURN_IF_ERROR(seq.store_->save());
  Writer payload;
  for (uint32_t l = 0; l < s.layers; ++l) {
    const uint32_t full = static_cast<uint32_t>(seq.layer_tokens_[l] / C);
    for (uint32_t h = 0; h < s.kv_heads; ++h)
      for (uint32_t b = 0; b < full; ++b) KVT_RETURN_IF_ERROR(rows(payload, seq.summaries_[l], h, b));
  }
  payload.put(seq.tail_.data(), seq.tail_.size() * sizeof(bf16));
  Writer file;
  file.put(kMagic, sizeof(kMagic));
  const Header h = header_of(s, options_.policy, seq.max_tokens_);
  file.put(uint32_t{sizeof(Header)});
  file.put(h);
  file.put(seq.layer_tokens_.data(), seq.layer_tokens_.size() * sizeof(uint64_t));
  file.put(storage::crc32c(payload.bytes().data(), payload.bytes().size()));
  file.put(uint64_t{payload.bytes().size()});
  const std::filesystem::path meta = path.string() + ".meta", tmp = path.string() + ".meta.tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(file.bytes().data()), static_cast<std::streamsize>(file.bytes().size()));
    out.write(reinterpret_cast<const char*>(payload.bytes().data()),
              static_cast<std::streamsize>(payload.bytes().size()));
    out.flush();
    if (!out) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      return io_error("saving " + meta.string() + ": write failed (disk full?); the session is unchanged");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, meta, ec);
  if (ec) return io_error("saving " + meta.string() + ": rename failed: " + ec.message());
  return Status::ok_status();
}

Result<std::unique_ptr<SequenceKv>> Executor::open_sequence(uint64_t host_bytes, const std::filesystem::path& path,
                                                            int numa_node) {
  const ModelShape& s = options_.shape;
  const SparsityPolicy& p = options_.policy;
  const std::filesystem::path meta = path.string() + ".meta";
  std::ifstream in(meta, std::ios::binary);
  if (!in)
    return not_found("opening session " + path.string() + ": its sidecar " + meta.string() +
                     " is missing; was the session saved (Session::save)?");
  in.seekg(0, std::ios::end);
  const auto size = static_cast<size_t>(in.tellg());
  in.seekg(0);
  std::vector<std::byte> all(size);
  in.read(reinterpret_cast<char*>(all.data()), static_cast<std::streamsize>(size));
  if (!in) return io_error("opening session " + path.string() + ": reading " + meta.string() + " failed");
  Reader r(all, meta.string());
  char magic[8];
  KVT_RETURN_IF_ERROR(r.get(magic, 8));
  if (std::memcmp(magic, kMagic, 8) != 0) return corrupt(meta.string() + " is not a kvtier session sidecar");
  uint32_t header_bytes = 0;
  KVT_RETURN_IF_ERROR(r.get(header_bytes));
  if (header_bytes != sizeof(Header)) return corrupt(meta.string() + ": unknown header size " + std::to_string(header_bytes));
  Header h{};
  KVT_RETURN_IF_ERROR(r.get(h));
  Header want = header_of(s, p, h.max_tokens);
  want.topk = h.topk;  // top-k may change between runs: it is not part of what is stored
  if (std::memcmp(&h, &want, sizeof(Header)) != 0)
    return invalid_argument("opening session " + path.string() + ": it holds a context of another shape or policy (" +
                            describe_header(h) + "); this engine has " + describe_header(want) +
                            "; open it with the shape and policy it was made with");
  std::vector<uint64_t> tokens(s.layers);
  KVT_RETURN_IF_ERROR(r.get(tokens.data(), tokens.size() * sizeof(uint64_t)));
  uint32_t crc = 0;
  uint64_t payload_bytes = 0;
  KVT_RETURN_IF_ERROR(r.get(crc));
  KVT_RETURN_IF_ERROR(r.get(payload_bytes));
  const size_t head = 8 + 4 + sizeof(Header) + tokens.size() * 8 + 4 + 8;
  if (all.size() != head + payload_bytes)
    return corrupt(meta.string() + " holds " + std::to_string(all.size()) + " bytes, expected " +
                   std::to_string(head + payload_bytes) + " (truncated or torn)");
  if (storage::crc32c(all.data() + head, payload_bytes) != crc)
    return corrupt(meta.string() + ": checksum mismatch; the sidecar is damaged");
  for (uint64_t t : tokens)
    if (t > h.max_tokens) return corrupt(meta.string() + ": a layer's token count exceeds max_tokens");

  KVT_ASSIGN_OR_RETURN(std::unique_ptr<storage::BlockFile> file,
                       storage::BlockFile::open(path.string(), storage::UringOptions{}));
  GpuSummaries summaries = reserve_gpu_summaries(h.max_tokens);
  KVT_ASSIGN_OR_RETURN(const storage::StoreConfig config,
                       store_config(h.max_tokens, host_bytes, numa_node, summaries));
  std::unique_ptr<SequenceKv> seq(new SequenceKv());
  seq->gpu_summaries_ = std::move(summaries);
  KVT_ASSIGN_OR_RETURN(seq->store_, storage::TieredStore::reopen(backend_, config, std::move(file)));
  KVT_RETURN_IF_ERROR(init_sequence(*seq, h.max_tokens));
  seq->layer_tokens_ = tokens;
  const uint32_t C = p.chunk_tokens;
  for (uint32_t l = 0; l < s.layers; ++l) {
    const uint32_t full = static_cast<uint32_t>(tokens[l] / C);
    for (uint32_t kh = 0; kh < s.kv_heads; ++kh)
      for (uint32_t b = 0; b < full; ++b) {
        KVT_RETURN_IF_ERROR(rows(r, seq->summaries_[l], kh, b));
        if (!seq->store_->resident(seq->flat(l, kh, b), storage::Tier::kNvme))
          return corrupt("opening session " + path.string() + ": block " + std::to_string(seq->flat(l, kh, b)) +
                         " of a prefilled chunk is not in the file");
      }
  }
  KVT_RETURN_IF_ERROR(r.get(seq->tail_.data(), seq->tail_.size() * sizeof(bf16)));
  uint64_t min_tokens = tokens[0];
  for (uint64_t t : tokens) min_tokens = std::min(min_tokens, t);
  seq->store_->set_sequence_tokens(min_tokens);
  if (cuda_ != nullptr) {
    const gpu::SlotArenaView arena{arena_->slot_data(0), arena_->slot_bytes(), arena_->capacity(), C, s.head_dim};
    for (uint32_t l = 0; l < s.layers; ++l)
      for (uint32_t kh = 0; kh < s.kv_heads; ++kh)
        if (tokens[l] % C != 0)
          KVT_RETURN_IF_ERROR(gpu_->upload_tail(seq->tail(l, kh), seq->tail_slots_[l * s.kv_heads + kh], arena,
                                                static_cast<uint32_t>(tokens[l] % C), s.head_dim));
  }
  return seq;
}

}  // namespace kvtier::scheduler
