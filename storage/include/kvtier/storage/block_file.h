// BlockFile: the NVMe home of one context's blocks. Block i lives at a fixed
// 4 KiB-aligned offset; a header records the geometry and a CRC32C per block,
// so a prefilled context can be reopened by a later process. Every read is
// verified against the checksum written with the block; a mismatch is re-read
// once, then reported naming the file, block and offset. Short transfers and
// -EAGAIN are retried (bounded). Layout:
//   [header 4 KiB][checksum table, 4 KiB-aligned][block 0][block 1]...
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvtier/core/block.h"
#include "kvtier/core/status.h"
#include "kvtier/storage/block_device.h"

namespace kvtier::storage {

// What a context file holds: every block of `chunks_per_head` chunks of every
// (layer, kv_head) of `shape`, numbered by BlockGeometry::flat_index.
struct FileGeometry {
  ModelShape shape;
  uint32_t chunk_tokens = 64;
  uint32_t chunks_per_head = 0;

  uint64_t block_count() const;
  uint64_t slot_bytes() const;  // BlockGeometry::slot_bytes(): the on-disk stride
  friend bool operator==(const FileGeometry&, const FileGeometry&) = default;
};

// One block to move: its flat index and a 4 KiB-aligned buffer of slot_bytes.
struct BlockIo {
  uint64_t index = 0;
  std::byte* buf = nullptr;
};

// Blocks handed to the device per execute() call (a write or read batch):
// bounds the request vector; the device bounds what is in flight by its queue depth.
inline constexpr size_t kFileBatchBlocks = 256;
// Largest write request write_blocks makes of blocks adjacent in the file
// and in memory (prefill's home writes of one KV head's new chunks).
inline constexpr uint64_t kFileWriteRequestBytesMax = uint64_t{1} << 20;

struct BlockFileStats {
  uint64_t blocks_read = 0, blocks_written = 0;
  uint64_t retries = 0;            // short transfers and -EAGAIN resubmitted
  uint64_t checksum_rereads = 0;   // mismatches that a re-read fixed
  uint64_t checksum_failures = 0;  // mismatches reported as errors
};

// Thread-safe: calls are serialised internally (one ring per file), batch by
// batch, so one thread's long write lets another's reads in between batches.
// Two calls moving the same block at once are the caller's race.
class BlockFile {
 public:
  // Creates `path` (must not exist), preallocating header, table and every
  // block; a disk too small fails here with the bytes needed and available.
  static Result<std::unique_ptr<BlockFile>> create(const std::string& path, const FileGeometry& geometry,
                                                   const UringOptions& options);
  // Reopens a file written by create(); a truncated or foreign file is an
  // error naming what does not match.
  static Result<std::unique_ptr<BlockFile>> open(const std::string& path, const UringOptions& options);
  // The same over any BlockDevice (the fault-injecting one in tests).
  static Result<std::unique_ptr<BlockFile>> create_on(std::unique_ptr<BlockDevice> device,
                                                      const FileGeometry& geometry);
  static Result<std::unique_ptr<BlockFile>> open_on(std::unique_ptr<BlockDevice> device);

  ~BlockFile();  // flushes the header and table; errors are logged

  // Writes blocks home and records their checksums. A failed write leaves the
  // block's previous contents and checksum valid (or the block unwritten).
  // Blocks adjacent both in the file and in memory go as one request of up to
  // kFileWriteRequestBytesMax. When such a request fails, its blocks that
  // did not wholly land become unwritten (the drive may have stored any part
  // of it), where a lone block's failed write keeps its old contents.
  Status write_blocks(std::span<const BlockIo> blocks);
  // The same with each block's CRC32C of its slot bytes computed by the
  // caller (crcs[i] for blocks[i]), e.g. while copying the bytes into place,
  // so that no pass over them runs between the drive's requests. A wrong
  // checksum is recorded as given: the block then reads back as corrupt.
  Status write_blocks(std::span<const BlockIo> blocks, std::span<const uint32_t> crcs);
  // Reads blocks and verifies each against its checksum. Reading a block that
  // was never written is an error.
  Status read_blocks(std::span<const BlockIo> blocks);
  // Persists the header and checksum table and syncs the device.
  Status flush();

  bool written(uint64_t index) const;
  uint32_t checksum(uint64_t index) const;
  const FileGeometry& geometry() const;
  const std::string& path() const;
  uint64_t block_offset(uint64_t index) const;  // byte offset of block `index` in the file
  BlockFileStats stats() const;
  BlockDevice& device();

  struct Impl;

 private:
  explicit BlockFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier::storage
