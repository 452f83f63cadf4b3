// BlockFile: a context's blocks at fixed offsets in one file, each guarded by
// a CRC32C kept in a checksum table that the header in turn guards.
//
// Crash behaviour: the table is persisted only by flush() (and the
// destructor). If the process dies between a write and the next flush, the
// file on disk holds new block bytes next to the old table: a block written
// for the first time reads as "never written", and a block rewritten reads
// as a checksum mismatch, reported as corruption. Either way a reader gets an
// error, never wrong data. A crash during flush() tears the header or table,
// which open() detects through their own checksums.
#include "kvtier/storage/block_file.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <sstream>
#include <type_traits>
#include <unordered_set>

#include "kvtier/core/log.h"
#include "kvtier/storage/crc32c.h"
#include "uring_util.h"

namespace kvtier::storage {

uint64_t FileGeometry::block_count() const {
  return BlockGeometry(shape, chunk_tokens).block_count(chunks_per_head);
}

uint64_t FileGeometry::slot_bytes() const { return BlockGeometry(shape, chunk_tokens).slot_bytes(); }

namespace {

using detail::AlignedBytes;
using detail::errno_text;

static_assert(std::endian::native == std::endian::little, "the on-disk format is little-endian");

constexpr char kMagic[8] = {'K', 'V', 'T', 'I', 'E', 'R', 'K', 'V'};
constexpr uint32_t kFormatVersion = 1;
constexpr uint64_t kHeaderBytes = 4096;
constexpr uint32_t kFlagWritten = 1;
// Submissions of one transfer before it is reported: short transfers,
// Short transfers and -EAGAIN are resubmitted this many times in all (-EIO once).
constexpr int kMaxAttempts = 8;
// The header and table move in requests of at most this size.
constexpr uint64_t kMetaRequestBytes = uint64_t{1} << 20;
// Largest file the format describes; keeps every offset sum far from overflow.
constexpr uint64_t kFileBytesMax = uint64_t{1} << 60;

// The header as stored at offset 0, zero-padded to kHeaderBytes.
struct DiskHeader {
  char magic[8];
  uint32_t version;
  uint32_t header_crc;  // crc32c of this struct with header_crc = 0
  uint32_t layers, q_heads, kv_heads, head_dim;
  uint32_t dtype, chunk_tokens, chunks_per_head;
  uint32_t table_crc;  // crc32c of the block_count table entries
  uint64_t block_count, slot_bytes, table_offset, table_bytes, data_offset, file_bytes;
};
static_assert(sizeof(DiskHeader) == 96 && std::is_trivially_copyable_v<DiskHeader>);

// One per block, in block order, right after the header.
struct TableEntry {
  uint32_t crc;
  uint32_t flags;  // bit 0: the block was written
};
static_assert(sizeof(TableEntry) == 8);

// Where everything lies in the file; a pure function of the geometry.
struct Layout {
  uint64_t block_count = 0, slot_bytes = 0, table_offset = 0, table_bytes = 0, data_offset = 0, file_bytes = 0;
  friend bool operator==(const Layout&, const Layout&) = default;
};

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

std::string hex32(uint32_t v) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", v);
  return text;
}

Status validate_geometry(const FileGeometry& g) {
  KVT_RETURN_IF_ERROR(validate(g.shape));
  if (g.chunk_tokens < kChunkTokensMin || g.chunk_tokens > kChunkTokensMax)
    return invalid_field("context file geometry", "chunk_tokens", g.chunk_tokens,
                         "is outside " + std::to_string(kChunkTokensMin) + ".." + std::to_string(kChunkTokensMax));
  if (g.chunks_per_head < 1) return invalid_field("context file geometry", "chunks_per_head", 0, "must be >= 1");
  return Status::ok_status();
}

Result<Layout> layout_for(const FileGeometry& g) {
  KVT_RETURN_IF_ERROR(validate_geometry(g));
  Layout l;
  l.block_count = g.block_count();
  l.slot_bytes = g.slot_bytes();
  l.table_offset = kHeaderBytes;
  l.table_bytes = round_up(l.block_count * sizeof(TableEntry), kBlockAlignBytes);
  l.data_offset = l.table_offset + l.table_bytes;
  if (l.block_count > (kFileBytesMax - l.data_offset) / l.slot_bytes)
    return out_of_range("context file geometry: " + std::to_string(l.block_count) + " blocks of " +
                        std::to_string(l.slot_bytes) + " bytes exceed the 2^60-byte file limit");
  l.file_bytes = l.data_offset + l.block_count * l.slot_bytes;
  return l;
}

// One contiguous transfer and how far it got.
struct Extent {
  uint64_t offset = 0;
  std::byte* buf = nullptr;
  uint32_t bytes = 0;
  uint32_t done = 0;
  int error = 0;       // errno that ended it (not retried), 0 if none
  int last_errno = 0;  // the last retried errno, for the message
  bool eio_retried = false;  // EIO gets one more try, like a checksum mismatch
  bool eof = false;    // a read hit the end of the file
  bool finished() const { return done == bytes || error != 0 || eof; }
  bool ok() const { return done == bytes; }
};

// Why an extent did not complete, in words.
std::string extent_failure(const Extent& e) {
  if (e.error != 0) return errno_text(e.error);
  if (e.eof)
    return "unexpected end of file after " + std::to_string(e.done) + " of " + std::to_string(e.bytes) +
           " bytes (the file is shorter than its header says)";
  return "incomplete after " + std::to_string(kMaxAttempts) + " attempts (" + std::to_string(e.done) + " of " +
         std::to_string(e.bytes) + " bytes moved" +
         (e.last_errno != 0 ? ", last error: " + errno_text(e.last_errno) : std::string()) + ")";
}

// Applies one completion: progress, a retryable failure, or a final error.
void apply_result(Extent& e, IoRequest::Op op, int32_t res) {
  const uint32_t remaining = e.bytes - e.done;
  if (res > 0) {
    KVT_ASSERT(static_cast<uint32_t>(res) <= remaining, "device moved ", res, " bytes of ", remaining, " asked");
    e.done += static_cast<uint32_t>(res);
  } else if (res == 0) {
    // A read of 0 bytes is the end of the file; a write of 0 made no
    // progress and is retried like a short write.
    if (op == IoRequest::Op::kRead) e.eof = true;
  } else if (res == -EAGAIN || res == -EINTR) {
    e.last_errno = -res;
  } else if (res == -EIO && !e.eio_retried) {
    // An EIO can be transient (a path reset), but usually the drive already
    // retried: one more try, then it is reported.
    e.eio_retried = true;
    e.last_errno = EIO;
  } else {
    e.error = -res;
  }
}

// Runs extents to completion or failure, resubmitting the unfinished rest at
// most kMaxAttempts times. Only a broken device is an error Status here;
// per-extent outcomes stay in the extents.
Status transfer(BlockDevice& device, IoRequest::Op op, std::span<Extent> extents, uint64_t* retries) {
  std::vector<IoRequest> requests;
  std::vector<size_t> owner;
  for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
    requests.clear(), owner.clear();
    for (size_t i = 0; i < extents.size(); ++i) {
      const Extent& e = extents[i];
      if (e.finished()) continue;
      requests.push_back(IoRequest{op, e.offset + e.done, e.buf + e.done, e.bytes - e.done, 0});
      owner.push_back(i);
    }
    if (requests.empty()) return Status::ok_status();
    if (attempt > 0) *retries += requests.size();
    KVT_RETURN_IF_ERROR(device.execute(requests));
    for (size_t k = 0; k < requests.size(); ++k) apply_result(extents[owner[k]], op, requests[k].result);
  }
  return Status::ok_status();
}

// Header and table extents over one contiguous buffer, in requests of at most kMetaRequestBytes.
std::vector<Extent> meta_extents(std::byte* buf, uint64_t bytes) {
  std::vector<Extent> extents;
  for (uint64_t at = 0; at < bytes; at += kMetaRequestBytes)
    extents.push_back(Extent{at, buf + at, static_cast<uint32_t>(std::min(kMetaRequestBytes, bytes - at))});
  return extents;
}

const Extent* first_failed(std::span<const Extent> extents) {
  for (const Extent& e : extents)
    if (!e.ok()) return &e;
  return nullptr;
}

}  // namespace

struct BlockFile::Impl {
  mutable std::mutex mu;
  std::unique_ptr<BlockDevice> device;
  FileGeometry geometry;
  BlockGeometry block_geometry;
  Layout layout;
  // Header (first kHeaderBytes) and checksum table, exactly as on disk, so
  // flush() writes it without a copy.
  AlignedBytes meta;
  bool dirty = false;
  BlockFileStats stats;

  Impl(std::unique_ptr<BlockDevice> d, const FileGeometry& g, const Layout& l)
      : device(std::move(d)), geometry(g), block_geometry(g.shape, g.chunk_tokens), layout(l) {}

  const std::string& path() const { return device->path(); }
  TableEntry* table() { return reinterpret_cast<TableEntry*>(meta.get() + kHeaderBytes); }
  uint64_t offset_of(uint64_t index) const { return layout.data_offset + index * layout.slot_bytes; }
  std::string describe_block(uint64_t index) const;
  Status block_error(std::string_view what, uint64_t index, const Extent& e) const;
  Status check_blocks(std::span<const BlockIo> blocks, bool write) const;
  DiskHeader make_header();
  Status flush_locked();
  // Reads the header and table region and checks the table against expected_crc.
  Status load_table(uint32_t expected_crc);
  Status write_batch(std::span<const BlockIo> blocks, std::span<const uint32_t> crcs);
  // write_batch over checked blocks, kFileBatchBlocks at a time, each under the lock.
  Status write_batches(std::span<const BlockIo> blocks, std::span<const uint32_t> crcs);
  Status read_batch(std::span<const BlockIo> blocks);
  Status read_verified(std::span<const BlockIo> blocks, std::vector<uint32_t>* read_crcs);
};

std::string BlockFile::Impl::describe_block(uint64_t index) const {
  std::ostringstream os;
  os << path() << ", block " << index << " (" << block_geometry.from_flat_index(index, geometry.chunks_per_head)
     << "), offset " << offset_of(index);
  return os.str();
}

Status BlockFile::Impl::block_error(std::string_view what, uint64_t index, const Extent& e) const {
  std::string message = std::string(what) + " " + describe_block(index) + ": " + extent_failure(e);
  if (e.error == ENOSPC || e.error == EDQUOT) return no_space(std::move(message));
  return io_error(std::move(message));
}

// Bad indices and buffers are caller errors, but they arrive at a module
// boundary, so they come back as Status rather than an abort.
Status BlockFile::Impl::check_blocks(std::span<const BlockIo> blocks, bool write) const {
  std::unordered_set<uint64_t> seen;
  for (const BlockIo& b : blocks) {
    if (b.index >= layout.block_count)
      return out_of_range("block " + std::to_string(b.index) + " is outside " + path() + " (" +
                          std::to_string(layout.block_count) + " blocks)");
    if (b.buf == nullptr || reinterpret_cast<uintptr_t>(b.buf) % kBlockAlignBytes != 0)
      return invalid_argument("buffer of block " + std::to_string(b.index) + " is not 4 KiB-aligned (O_DIRECT needs it)");
    // Two writes of one block in flight at once would land in either order.
    if (write && !seen.insert(b.index).second)
      return invalid_argument("block " + std::to_string(b.index) + " appears twice in one write_blocks() call");
  }
  return Status::ok_status();
}

DiskHeader BlockFile::Impl::make_header() {
  DiskHeader h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.version = kFormatVersion;
  h.layers = geometry.shape.layers, h.q_heads = geometry.shape.q_heads;
  h.kv_heads = geometry.shape.kv_heads, h.head_dim = geometry.shape.head_dim;
  h.dtype = static_cast<uint32_t>(geometry.shape.dtype);
  h.chunk_tokens = geometry.chunk_tokens, h.chunks_per_head = geometry.chunks_per_head;
  h.table_crc = crc32c(table(), layout.block_count * sizeof(TableEntry));
  h.block_count = layout.block_count, h.slot_bytes = layout.slot_bytes;
  h.table_offset = layout.table_offset, h.table_bytes = layout.table_bytes;
  h.data_offset = layout.data_offset, h.file_bytes = layout.file_bytes;
  h.header_crc = crc32c(&h, sizeof h);
  return h;
}

// Data first, then the table that vouches for it: a crash in between leaves
// the old table, which flags the new data as mismatched rather than trusting it.
Status BlockFile::Impl::flush_locked() {
  const std::string context = "flushing " + path();
  KVT_RETURN_IF_ERROR(device->sync().with_context(context));
  const DiskHeader header = make_header();
  std::memcpy(meta.get(), &header, sizeof header);
  std::vector<Extent> extents = meta_extents(meta.get(), kHeaderBytes + layout.table_bytes);
  KVT_RETURN_IF_ERROR(transfer(*device, IoRequest::Op::kWrite, extents, &stats.retries).with_context(context));
  if (const Extent* e = first_failed(extents))
    return io_error("writing the header and checksum table of " + path() + " at offset " +
                    std::to_string(e->offset) + ": " + extent_failure(*e));
  KVT_RETURN_IF_ERROR(device->sync().with_context(context));
  dirty = false;
  return Status::ok_status();
}

// Blocks adjacent both in the file and in memory go to the device as one
// request of up to kFileWriteRequestBytesMax (prefill writes a KV head's new
// chunks in file order from one buffer: 32 KiB blocks become 1 MiB writes,
// which a drive takes faster than the same bytes in 32 KiB requests).
// Each block's outcome is read from its extent's progress.
Status BlockFile::Impl::write_batch(std::span<const BlockIo> blocks, std::span<const uint32_t> crcs) {
  const uint64_t slot = layout.slot_bytes;
  const uint64_t per_extent = std::max<uint64_t>(1, kFileWriteRequestBytesMax / slot);
  std::vector<Extent> extents;
  std::vector<size_t> extent_of(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) {
    const bool joins = i > 0 && blocks[i].index == blocks[i - 1].index + 1 && blocks[i].buf == blocks[i - 1].buf + slot &&
                       extents.back().bytes / slot < per_extent;
    if (joins)
      extents.back().bytes += static_cast<uint32_t>(slot);
    else
      extents.push_back(Extent{offset_of(blocks[i].index), blocks[i].buf, static_cast<uint32_t>(slot)});
    extent_of[i] = extents.size() - 1;
  }
  KVT_RETURN_IF_ERROR(transfer(*device, IoRequest::Op::kWrite, extents, &stats.retries).with_context(path()));
  Status first;
  for (size_t i = 0; i < blocks.size(); ++i) {
    TableEntry& entry = table()[blocks[i].index];
    const Extent& e = extents[extent_of[i]];
    // This block's bytes within its extent: [begin, begin + slot).
    const uint64_t begin = static_cast<uint64_t>(blocks[i].buf - e.buf);
    const bool landed = e.done >= begin + slot;
    const bool joined = e.bytes > slot;
    if (landed) {
      entry = TableEntry{crcs[i], kFlagWritten};
      ++stats.blocks_written;
    } else if (e.done > begin || joined) {
      // Part of its new bytes landed, or it was in a joined request that
      // failed (a drive may store any part of a request it fails, past what
      // it reports): the old contents may be gone, so the block becomes
      // unwritten. (A lone block with none of its bytes reported may still
      // have been torn; the old checksum then reports it as corrupt on read.)
      entry = TableEntry{0, 0};
    }
    if (!landed && first.ok()) first = block_error("write of", blocks[i].index, e);
    dirty = true;
  }
  return first;
}

// Reads blocks and fills the crc32c of what arrived; an I/O failure is an error.
Status BlockFile::Impl::read_verified(std::span<const BlockIo> blocks, std::vector<uint32_t>* read_crcs) {
  std::vector<Extent> extents;
  for (const BlockIo& b : blocks)
    extents.push_back(Extent{offset_of(b.index), b.buf, static_cast<uint32_t>(layout.slot_bytes)});
  KVT_RETURN_IF_ERROR(transfer(*device, IoRequest::Op::kRead, extents, &stats.retries).with_context(path()));
  for (size_t i = 0; i < blocks.size(); ++i)
    if (!extents[i].ok()) return block_error("read of", blocks[i].index, extents[i]);
  read_crcs->clear();
  for (const BlockIo& b : blocks) read_crcs->push_back(crc32c(b.buf, layout.slot_bytes));
  return Status::ok_status();
}

Status BlockFile::Impl::read_batch(std::span<const BlockIo> blocks) {
  for (const BlockIo& b : blocks)
    if ((table()[b.index].flags & kFlagWritten) == 0)
      return invalid_argument("read of " + describe_block(b.index) + ": the block was never written");
  std::vector<uint32_t> crcs;
  KVT_RETURN_IF_ERROR(read_verified(blocks, &crcs));
  std::vector<BlockIo> mismatched;
  for (size_t i = 0; i < blocks.size(); ++i)
    if (crcs[i] != table()[blocks[i].index].crc) mismatched.push_back(blocks[i]);
  // A mismatch may be a transient flip on the way (DMA, cable, a bad cache
  // line): one re-read tells that from corruption at rest.
  if (!mismatched.empty()) {
    KVT_RETURN_IF_ERROR(read_verified(mismatched, &crcs));
    for (size_t i = 0; i < mismatched.size(); ++i) {
      const uint64_t index = mismatched[i].index;
      if (crcs[i] == table()[index].crc) {
        ++stats.checksum_rereads;
        continue;
      }
      ++stats.checksum_failures;
      return corrupt("checksum mismatch in " + describe_block(index) + ": stored crc32c " +
                     hex32(table()[index].crc) + ", read " + hex32(crcs[i]) + " (re-read once)");
    }
  }
  stats.blocks_read += blocks.size();
  return Status::ok_status();
}

// ---- opening ---------------------------------------------------------------

namespace {

// The file's size and the header bytes, or why the file is not a context file.
Result<DiskHeader> read_header(BlockDevice& device, uint64_t* retries) {
  const std::string& path = device.path();
  const uint64_t size = device.size_bytes();
  if (size < kHeaderBytes)
    return invalid_argument("not a kvtier context file: " + path + " is " + std::to_string(size) +
                            " bytes, less than the " + std::to_string(kHeaderBytes) + "-byte header");
  AlignedBytes buf = detail::aligned_bytes(kHeaderBytes, kBlockAlignBytes);
  if (!buf) return out_of_memory("cannot allocate a 4 KiB header buffer for " + path);
  Extent e{0, buf.get(), static_cast<uint32_t>(kHeaderBytes)};
  KVT_RETURN_IF_ERROR(transfer(device, IoRequest::Op::kRead, std::span(&e, 1), retries).with_context(path));
  if (!e.ok()) return io_error("reading the header of " + path + ": " + extent_failure(e));
  DiskHeader h;
  std::memcpy(&h, buf.get(), sizeof h);
  return h;
}

Result<Layout> check_header(DiskHeader h, const std::string& path, FileGeometry* geometry) {
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0)
    return invalid_argument("not a kvtier context file: " + path + " does not start with \"KVTIERKV\"");
  if (h.version != kFormatVersion)
    return unsupported(path + " has context file format version " + std::to_string(h.version) +
                       "; this build reads version " + std::to_string(kFormatVersion));
  const uint32_t stored = h.header_crc;
  h.header_crc = 0;
  if (const uint32_t computed = crc32c(&h, sizeof h); computed != stored)
    return corrupt("header of " + path + " is corrupt: stored crc32c " + hex32(stored) + ", computed " +
                   hex32(computed));
  if (h.dtype > static_cast<uint32_t>(DType::kF32))
    return corrupt("header of " + path + " names dtype " + std::to_string(h.dtype) + ", which does not exist");
  *geometry = FileGeometry{ModelShape{h.layers, h.q_heads, h.kv_heads, h.head_dim, static_cast<DType>(h.dtype)},
                           h.chunk_tokens, h.chunks_per_head};
  Result<Layout> layout = layout_for(*geometry);
  if (!layout.ok()) return corrupt("header of " + path + " holds a bad geometry: " + layout.status().message());
  const Layout stated{h.block_count, h.slot_bytes, h.table_offset, h.table_bytes, h.data_offset, h.file_bytes};
  if (!(stated == *layout))
    return corrupt("header of " + path + " is inconsistent: it says " + std::to_string(h.block_count) +
                   " blocks of " + std::to_string(h.slot_bytes) + " bytes in " + std::to_string(h.file_bytes) +
                   " bytes, its geometry gives " + std::to_string(layout->block_count) + " of " +
                   std::to_string(layout->slot_bytes) + " in " + std::to_string(layout->file_bytes));
  return layout;
}

}  // namespace

// ---- BlockFile -------------------------------------------------------------

BlockFile::BlockFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

BlockFile::~BlockFile() {
  if (!impl_) return;
  std::lock_guard lock(impl_->mu);
  if (!impl_->dirty) return;
  if (Status s = impl_->flush_locked(); !s.ok())
    KVT_LOG_ERROR("closing ", impl_->path(), ": ", s.to_string(),
                  " (checksums of blocks written since the last flush are lost; they will read as errors)");
}

Result<std::unique_ptr<BlockFile>> BlockFile::create_on(std::unique_ptr<BlockDevice> device,
                                                        const FileGeometry& geometry) {
  KVT_ASSERT(device != nullptr);
  const std::string path = device->path();
  KVT_ASSIGN_OR_RETURN(const Layout layout, layout_for(geometry));
  const std::string context = "creating " + path + " (" + std::to_string(layout.file_bytes) + " bytes: " +
                              std::to_string(layout.block_count) + " blocks of " +
                              std::to_string(layout.slot_bytes) + " bytes, header and checksum table)";
  // Preallocating every block makes a disk too small fail now, not hours
  // into a prefill.
  KVT_RETURN_IF_ERROR(device->allocate(layout.file_bytes).with_context(context));
  auto impl = std::make_unique<Impl>(std::move(device), geometry, layout);
  impl->meta = detail::aligned_bytes(kHeaderBytes + layout.table_bytes, kBlockAlignBytes);
  if (!impl->meta)
    return out_of_memory(context + ": cannot allocate " + std::to_string(layout.table_bytes) +
                         " bytes for the checksum table");
  KVT_RETURN_IF_ERROR(impl->flush_locked().with_context(context));
  return std::unique_ptr<BlockFile>(new BlockFile(std::move(impl)));
}

namespace {

// Reads and checks the header; a checksum mismatch is re-read once, as for
// blocks, since a transfer can flip a bit that the medium holds intact.
Result<std::pair<DiskHeader, Layout>> read_checked_header(BlockDevice& device, FileGeometry* geometry,
                                                          uint64_t* retries) {
  Status last;
  for (int attempt = 0; attempt < 2; ++attempt) {
    KVT_ASSIGN_OR_RETURN(const DiskHeader header, read_header(device, retries));
    Result<Layout> layout = check_header(header, device.path(), geometry);
    if (layout.ok()) return std::pair{header, *layout};
    last = layout.status();
    if (last.code() != StatusCode::kCorrupt) break;
  }
  return last;
}

}  // namespace

Status BlockFile::Impl::load_table(uint32_t expected_crc) {
  const uint64_t table_bytes = layout.block_count * sizeof(TableEntry);
  uint32_t computed = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {  // re-read once, like a block
    std::vector<Extent> extents = meta_extents(meta.get(), kHeaderBytes + layout.table_bytes);
    KVT_RETURN_IF_ERROR(transfer(*device, IoRequest::Op::kRead, extents, &stats.retries));
    if (const Extent* e = first_failed(extents))
      return io_error("reading the checksum table of " + path() + ": " + extent_failure(*e));
    computed = crc32c(table(), table_bytes);
    if (computed == expected_crc) return Status::ok_status();
  }
  return corrupt("checksum table of " + path() + " is torn or corrupt: the header says crc32c " +
                 hex32(expected_crc) + ", the table gives " + hex32(computed) +
                 " (the file was not closed cleanly; its blocks cannot be trusted)");
}

Result<std::unique_ptr<BlockFile>> BlockFile::open_on(std::unique_ptr<BlockDevice> device) {
  KVT_ASSERT(device != nullptr);
  const std::string path = device->path();
  uint64_t retries = 0;
  FileGeometry geometry;
  KVT_ASSIGN_OR_RETURN(const auto checked, read_checked_header(*device, &geometry, &retries));
  const auto& [header, layout] = checked;
  if (device->size_bytes() < layout.file_bytes)
    return corrupt("truncated: " + path + " is " + std::to_string(device->size_bytes()) + " bytes, header says " +
                   std::to_string(layout.file_bytes));
  auto impl = std::make_unique<Impl>(std::move(device), geometry, layout);
  impl->stats.retries = retries;
  impl->meta = detail::aligned_bytes(kHeaderBytes + layout.table_bytes, kBlockAlignBytes);
  if (!impl->meta)
    return out_of_memory("opening " + path + ": cannot allocate " + std::to_string(layout.table_bytes) +
                         " bytes for the checksum table");
  KVT_RETURN_IF_ERROR(impl->load_table(header.table_crc));
  return std::unique_ptr<BlockFile>(new BlockFile(std::move(impl)));
}

namespace {

// Why `path` cannot be created: it exists, or its directory is missing, not a
// directory or not writable. The message names what to fix.
Status check_new_path(const std::string& path) {
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0)
    return invalid_argument(path + " already exists; kvtier never overwrites a context file (remove it or "
                            "choose another path)");
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  if (::stat(dir.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT) return not_found("directory " + dir + " does not exist (creating " + path + ")");
    if (err != ENOTDIR) return io_error("stat(" + dir + ") for " + path + ": " + errno_text(err));
  }
  if (!S_ISDIR(st.st_mode)) return invalid_argument(dir + " is not a directory (creating " + path + ")");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    return io_error("directory " + dir + " is not writable (creating " + path + "): " + errno_text(errno));
  return Status::ok_status();
}

}  // namespace

Result<std::unique_ptr<BlockFile>> BlockFile::create(const std::string& path, const FileGeometry& geometry,
                                                     const UringOptions& options) {
  KVT_RETURN_IF_ERROR(validate_geometry(geometry));
  KVT_RETURN_IF_ERROR(check_new_path(path));
  KVT_ASSIGN_OR_RETURN(auto device, open_uring_device(path, /*create=*/true, options));
  auto file = create_on(std::move(device), geometry);
  // O_EXCL made the file ours, so a failed create removes it.
  if (!file.ok()) ::unlink(path.c_str());
  return file;
}

Result<std::unique_ptr<BlockFile>> BlockFile::open(const std::string& path, const UringOptions& options) {
  KVT_ASSIGN_OR_RETURN(auto device, open_uring_device(path, /*create=*/false, options));
  return open_on(std::move(device));
}

// The lock (and the one ring under it) is taken per batch, not per call: a
// long write from one thread (prefill's write-behind) lets another thread's
// reads in between its batches instead of holding them for the whole call.
// Checksums are computed before the lock. check_blocks reads only the layout,
// which never changes.
Status BlockFile::Impl::write_batches(std::span<const BlockIo> blocks, std::span<const uint32_t> crcs) {
  for (size_t at = 0; at < blocks.size(); at += kFileBatchBlocks) {
    const size_t n = std::min(kFileBatchBlocks, blocks.size() - at);
    std::lock_guard lock(mu);
    KVT_RETURN_IF_ERROR(write_batch(blocks.subspan(at, n), crcs.subspan(at, n)));
  }
  return Status::ok_status();
}

Status BlockFile::write_blocks(std::span<const BlockIo> blocks) {
  KVT_RETURN_IF_ERROR(impl_->check_blocks(blocks, /*write=*/true));
  std::vector<uint32_t> crcs;
  crcs.reserve(blocks.size());
  for (const BlockIo& b : blocks) crcs.push_back(crc32c(b.buf, impl_->layout.slot_bytes));
  return impl_->write_batches(blocks, crcs);
}

Status BlockFile::write_blocks(std::span<const BlockIo> blocks, std::span<const uint32_t> crcs) {
  if (crcs.size() != blocks.size())
    return invalid_argument("write_blocks to " + path() + ": " + std::to_string(crcs.size()) + " checksums for " +
                            std::to_string(blocks.size()) + " blocks; give one per block");
  KVT_RETURN_IF_ERROR(impl_->check_blocks(blocks, /*write=*/true));
  return impl_->write_batches(blocks, crcs);
}

Status BlockFile::read_blocks(std::span<const BlockIo> blocks) {
  KVT_RETURN_IF_ERROR(impl_->check_blocks(blocks, /*write=*/false));
  for (size_t at = 0; at < blocks.size(); at += kFileBatchBlocks) {
    std::lock_guard lock(impl_->mu);
    KVT_RETURN_IF_ERROR(impl_->read_batch(blocks.subspan(at, std::min(kFileBatchBlocks, blocks.size() - at))));
  }
  return Status::ok_status();
}

Status BlockFile::flush() {
  std::lock_guard lock(impl_->mu);
  return impl_->flush_locked();
}

bool BlockFile::written(uint64_t index) const {
  std::lock_guard lock(impl_->mu);
  KVT_ASSERT(index < impl_->layout.block_count, "block ", index, " of ", impl_->layout.block_count);
  return (impl_->table()[index].flags & kFlagWritten) != 0;
}

uint32_t BlockFile::checksum(uint64_t index) const {
  std::lock_guard lock(impl_->mu);
  KVT_ASSERT(index < impl_->layout.block_count, "block ", index, " of ", impl_->layout.block_count);
  return impl_->table()[index].crc;
}

const FileGeometry& BlockFile::geometry() const { return impl_->geometry; }
const std::string& BlockFile::path() const { return impl_->path(); }

uint64_t BlockFile::block_offset(uint64_t index) const {
  KVT_ASSERT(index < impl_->layout.block_count, "block ", index, " of ", impl_->layout.block_count);
  return impl_->offset_of(index);
}

BlockFileStats BlockFile::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->stats;
}

BlockDevice& BlockFile::device() { return *impl_->device; }

}  // namespace kvtier::storage
