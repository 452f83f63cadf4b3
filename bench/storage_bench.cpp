// `kvtier bench storage`: random 32 KiB block reads (the NVMe tier's access
// pattern) through kvtier's own io_uring device at queue depths 1..64, large
// sequential reads and random block writes, each against a plain pread/pwrite
// baseline measured in the same run over the same file and the same block
// list. O_DIRECT keeps the page cache out of every figure (dropping caches
// would need root). Then the rest of the grid a machine profile needs (1 MiB
// reads and 32 KiB / 1 MiB writes at QD 1, 8, 32, 64, for kvtier calibrate),
// and the host<->GPU copy figures (h2d_bench.cpp).
#include <fcntl.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "kvtier/core/assert.h"
#include "kvtier/storage/block_device.h"
#include "suites.h"

namespace kvtier::bench {
namespace {

constexpr uint64_t kBlockBytes = 32 * 1024;  // one Llama-3.1-8B block at 64-token chunks
constexpr uint64_t kSeqBytes = 1 << 20;
constexpr uint32_t kPsyncThreads = 32;
constexpr uint32_t kQueueDepths[] = {1, 8, 32, 64};
constexpr uint32_t kSeqQueueDepth = 32;
// Request buffers: distinct for the 32 KiB requests of the deepest queue and
// for the sequential requests (which share them in turn); small enough to
// register as fixed buffers under a default 8 MiB RLIMIT_MEMLOCK.
constexpr uint64_t kRegionBytes = 4 << 20;
constexpr uint64_t kFillChunkBytes = 64 << 20;
constexpr uint64_t kBlockListSeed = 20261128;

struct Plan {
  uint64_t file_bytes;
  uint64_t blocks_per_repeat;
  int repeats;
  int warmup = 1;
};

Plan plan_for(const SuiteArgs& args) {
  return args.quick ? Plan{uint64_t{1} << 30, 16384, 3} : Plan{uint64_t{8} << 30, 65536, 5};
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<std::byte[], FreeDeleter>;

Buffer aligned_buffer(uint64_t bytes) {
  return Buffer(static_cast<std::byte*>(std::aligned_alloc(4096, bytes)));
}

// Random words with no zero byte: zero data can take shortcuts (sparse
// pages, compressing devices) that KV blocks never get.
void fill_nonzero(std::byte* p, uint64_t bytes, uint64_t& state) {
  for (uint64_t at = 0; at + 8 <= bytes; at += 8) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;  // xorshift64
    const uint64_t v = state | 0x0101010101010101ull;
    std::memcpy(p + at, &v, 8);
  }
}

// Removes the benchmark file on every way out of run_storage.
struct RemoveOnExit {
  std::string path;
  ~RemoveOnExit() {
    if (!path.empty()) ::unlink(path.c_str());
  }
};

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

int fail(const std::string& message) {
  std::cerr << "kvtier bench storage: " << message << "\n";
  return 1;
}

// statfs magic in hex and the fstype /proc/mounts gives the longest mount
// point above dir.
nlohmann::json fs_type(const std::string& dir) {
  nlohmann::json out = {{"f_type", nullptr}, {"name", nullptr}};
  struct statfs sfs{};
  if (::statfs(dir.c_str(), &sfs) == 0) {
    char hex[24];
    std::snprintf(hex, sizeof hex, "0x%lx", static_cast<unsigned long>(sfs.f_type));
    out["f_type"] = hex;
  }
  char real[PATH_MAX];
  if (::realpath(dir.c_str(), real) == nullptr) return out;
  const std::string path = real;
  std::ifstream mounts("/proc/mounts");
  std::string line, best;
  for (size_t best_len = 0; std::getline(mounts, line);) {
    std::istringstream fields(line);
    std::string device, mount_point, type;
    fields >> device >> mount_point >> type;
    const bool above = path == mount_point || mount_point == "/" ||
                       (path.rfind(mount_point, 0) == 0 && path.size() > mount_point.size() &&
                        path[mount_point.size()] == '/');
    if (above && mount_point.size() >= best_len) best = type, best_len = mount_point.size();
  }
  if (!best.empty()) out["name"] = best;
  return out;
}

// The random block list shared by every random-access figure.
std::vector<uint64_t> block_list(const Plan& plan) {
  std::mt19937_64 gen(kBlockListSeed);
  std::uniform_int_distribution<uint64_t> pick(0, plan.file_bytes / kBlockBytes - 1);
  std::vector<uint64_t> blocks(plan.blocks_per_repeat);
  for (uint64_t& b : blocks) b = pick(gen);
  return blocks;
}

// One io_uring device per queue depth over the same file, buffers registered.
struct UringSet {
  std::vector<std::unique_ptr<storage::BlockDevice>> by_depth;  // parallel to kQueueDepths
  storage::BlockDevice& depth(uint32_t qd) {
    for (size_t i = 0; i < std::size(kQueueDepths); ++i)
      if (kQueueDepths[i] == qd) return *by_depth[i];
    KVT_ASSERT(false, "no device for queue depth ", qd);
    return *by_depth[0];
  }
};

Status open_uring_set(const std::string& path, std::byte* region, UringSet* set) {
  for (const uint32_t qd : kQueueDepths) {
    storage::UringOptions options;
    options.queue_depth = qd;
    options.allow_buffered = false;
    KVT_ASSIGN_OR_RETURN(auto device, storage::open_uring_device(path, /*create=*/false, options));
    device->register_buffers(region, kRegionBytes);
    set->by_depth.push_back(std::move(device));
  }
  return Status::ok_status();
}

// Writes the whole file once, sequentially, with 1 MiB requests at QD32.
Status fill_file(storage::BlockDevice& device, uint64_t file_bytes) {
  Buffer chunk = aligned_buffer(kFillChunkBytes);
  if (!chunk) return out_of_memory("cannot allocate the 64 MiB fill buffer");
  uint64_t state = 0x9e3779b97f4a7c15ull;
  std::vector<storage::IoRequest> requests;
  for (uint64_t at = 0; at < file_bytes; at += kFillChunkBytes) {
    const uint64_t bytes = std::min(kFillChunkBytes, file_bytes - at);
    fill_nonzero(chunk.get(), bytes, state);
    requests.clear();
    for (uint64_t off = 0; off < bytes; off += kSeqBytes)
      requests.push_back({storage::IoRequest::Op::kWrite, at + off, chunk.get() + off,
                          static_cast<uint32_t>(std::min(kSeqBytes, bytes - off)), 0});
    KVT_RETURN_IF_ERROR(device.execute(requests));
    for (const auto& r : requests)
      if (r.result != static_cast<int32_t>(r.bytes))
        return io_error("filling " + device.path() + " at offset " + std::to_string(r.offset) + ": " +
                        (r.result < 0 ? std::strerror(-r.result) : "short write"));
  }
  return device.sync();
}

// ---- measured work: each records its first failure instead of throwing --

class FirstError {
 public:
  void set(const std::string& message) {
    std::lock_guard lock(mu_);
    if (message_.empty()) message_ = message;
  }
  bool failed() const {
    std::lock_guard lock(mu_);
    return !message_.empty();
  }
  std::string message() const {
    std::lock_guard lock(mu_);
    return message_;
  }

 private:
  mutable std::mutex mu_;
  std::string message_;
};

// 32 threads take blocks from a shared cursor and pread/pwrite each one.
void psync_blocks(int fd, const std::vector<uint64_t>& blocks, std::byte* region, bool write, FirstError* error) {
  std::atomic<size_t> next{0};
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < kPsyncThreads; ++t) {
    threads.emplace_back([&, t] {
      std::byte* buf = region + t * kBlockBytes;
      for (size_t i = next.fetch_add(1); i < blocks.size(); i = next.fetch_add(1)) {
        const off_t off = static_cast<off_t>(blocks[i] * kBlockBytes);
        const ssize_t n = write ? ::pwrite(fd, buf, kBlockBytes, off) : ::pread(fd, buf, kBlockBytes, off);
        if (n != static_cast<ssize_t>(kBlockBytes))
          error->set(std::string(write ? "pwrite" : "pread") + " at offset " + std::to_string(off) + ": " +
                     (n < 0 ? std::strerror(errno) : "short transfer"));
      }
    });
  }
  for (std::thread& t : threads) t.join();
}

void psync_sequential(int fd, uint64_t bytes, uint64_t file_bytes, std::byte* buf, FirstError* error) {
  for (uint64_t at = 0; at < bytes; at += kSeqBytes) {
    const off_t off = static_cast<off_t>(at % file_bytes);
    const ssize_t n = ::pread(fd, buf, kSeqBytes, off);
    if (n != static_cast<ssize_t>(kSeqBytes))
      error->set("pread 1 MiB at offset " + std::to_string(off) + ": " + (n < 0 ? std::strerror(errno) : "short read"));
  }
}

void uring_run(storage::BlockDevice& device, std::vector<storage::IoRequest>& requests, FirstError* error) {
  const Status s = device.execute(requests);
  if (!s.ok()) return error->set(s.to_string());
  for (const auto& r : requests)
    if (r.result != static_cast<int32_t>(r.bytes))
      return error->set("io_uring at offset " + std::to_string(r.offset) + ": " +
                        (r.result < 0 ? std::strerror(-r.result) : "short transfer"));
}

std::vector<storage::IoRequest> block_requests(const std::vector<uint64_t>& blocks, std::byte* region, bool write) {
  const uint64_t slots = kRegionBytes / kBlockBytes;
  std::vector<storage::IoRequest> requests;
  for (size_t i = 0; i < blocks.size(); ++i)
    requests.push_back({write ? storage::IoRequest::Op::kWrite : storage::IoRequest::Op::kRead,
                        blocks[i] * kBlockBytes, region + (i % slots) * kBlockBytes,
                        static_cast<uint32_t>(kBlockBytes), 0});
  return requests;
}

std::vector<storage::IoRequest> sequential_requests(uint64_t bytes, uint64_t file_bytes, std::byte* region,
                                                    bool write = false) {
  const uint64_t slots = kRegionBytes / kSeqBytes;
  std::vector<storage::IoRequest> requests;
  for (uint64_t at = 0, i = 0; at < bytes; at += kSeqBytes, ++i)
    requests.push_back({write ? storage::IoRequest::Op::kWrite : storage::IoRequest::Op::kRead, at % file_bytes,
                        region + (i % slots) * kSeqBytes, static_cast<uint32_t>(kSeqBytes), 0});
  return requests;
}


// Everything the figures share: the file, a device per queue depth, the
// plain descriptor for the baselines, request buffers and the block list.
struct Rig {
  std::string path;
  UringSet uring;
  int psync_fd = -1;
  std::unique_ptr<Fd> psync_owner;
  Buffer region;
  std::vector<uint64_t> blocks;
};

Status prepare(const SuiteArgs& args, const Plan& plan, RemoveOnExit* guard, Rig* rig) {
  rig->path = args.dir + "/kvtier-bench-storage-" + std::to_string(::getpid()) + ".dat";
  storage::UringOptions options;
  options.queue_depth = kSeqQueueDepth;
  KVT_ASSIGN_OR_RETURN(auto writer, storage::open_uring_device(rig->path, /*create=*/true, options));
  guard->path = rig->path;
  KVT_RETURN_IF_ERROR(writer->allocate(plan.file_bytes));
  std::cerr << "storage: writing " << (plan.file_bytes >> 20) << " MiB to " << rig->path << "\n";
  KVT_RETURN_IF_ERROR(fill_file(*writer, plan.file_bytes));
  rig->region = aligned_buffer(kRegionBytes);
  if (!rig->region) return out_of_memory("cannot allocate the request buffers");
  uint64_t state = 0x243f6a8885a308d3ull;
  fill_nonzero(rig->region.get(), kRegionBytes, state);
  KVT_RETURN_IF_ERROR(open_uring_set(rig->path, rig->region.get(), &rig->uring));
  rig->psync_fd = ::open(rig->path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (rig->psync_fd < 0) return io_error("open(" + rig->path + ", O_DIRECT): " + std::strerror(errno));
  rig->psync_owner = std::make_unique<Fd>(rig->psync_fd);
  // Every descriptor is open: unlinking now leaves nothing behind even if
  // the run is interrupted.
  ::unlink(rig->path.c_str());
  guard->path.clear();
  rig->blocks = block_list(plan);
  return Status::ok_status();
}

struct Figure {
  std::string name;
  double gbps;
  std::string baseline;
};

// GB/s of `bytes` per call at the median of the repeats, or the first failure.
Status measure(const Plan& plan, const std::string& name, const std::string& baseline, uint64_t bytes,
               const std::function<void(FirstError*)>& fn, std::vector<Figure>* out) {
  FirstError error;
  const Timing t = time_it(
      [&] {
        if (!error.failed()) fn(&error);
      },
      plan.warmup, plan.repeats);
  if (error.failed()) return io_error(name + ": " + error.message());
  out->push_back(Figure{name, static_cast<double>(bytes) / t.median_s / 1e9, baseline});
  std::cerr << "storage: " << name << " " << out->back().gbps << " GB/s\n";
  return Status::ok_status();
}

// The rest of the (request size, queue depth) grid that a machine profile's
// NVMe tables need (kvtier calibrate): 1 MiB sequential reads at the
// shallower depths, and 32 KiB random and 1 MiB sequential writes at every
// depth. The figures above already give the other read points and 32 KiB
// writes at QD32. --quick moves a quarter of the bytes per figure here: these
// figures only fill in a profile's table, and the QD1 points are slow.
uint64_t grid_blocks_per_repeat(const Plan& plan, bool quick) { return plan.blocks_per_repeat / (quick ? 4 : 1); }

Status measure_grid(const Plan& plan, Rig& rig, bool quick, std::vector<Figure>* out) {
  const auto end = rig.blocks.begin() + static_cast<ptrdiff_t>(grid_blocks_per_repeat(plan, quick));
  const std::vector<uint64_t> blocks(rig.blocks.begin(), end);
  const uint64_t bytes = blocks.size() * kBlockBytes;
  std::byte* region = rig.region.get();
  auto sequential = sequential_requests(bytes, plan.file_bytes, region);
  for (const uint32_t qd : {1u, 8u})
    KVT_RETURN_IF_ERROR(measure(plan, "uring_seq_read_1m_qd" + std::to_string(qd), "psync_seq_read_1m", bytes,
                                [&](FirstError* e) { uring_run(rig.uring.depth(qd), sequential, e); }, out));
  auto writes = block_requests(blocks, region, /*write=*/true);
  for (const uint32_t qd : {1u, 8u, 64u})
    KVT_RETURN_IF_ERROR(measure(plan, "uring_block_write_qd" + std::to_string(qd), "psync_block_write_32threads",
                                bytes, [&](FirstError* e) { uring_run(rig.uring.depth(qd), writes, e); }, out));
  auto sequential_writes = sequential_requests(bytes, plan.file_bytes, region, /*write=*/true);
  for (const uint32_t qd : kQueueDepths)
    KVT_RETURN_IF_ERROR(measure(plan, "uring_seq_write_1m_qd" + std::to_string(qd), "", bytes,
                                [&](FirstError* e) { uring_run(rig.uring.depth(qd), sequential_writes, e); }, out));
  return Status::ok_status();
}

// Each baseline is measured right before the figures that name it.
Status measure_all(const Plan& plan, Rig& rig, bool quick, std::vector<Figure>* out) {
  const uint64_t block_bytes = rig.blocks.size() * kBlockBytes;
  std::byte* region = rig.region.get();
  KVT_RETURN_IF_ERROR(measure(plan, "psync_rand_block_read_32threads", "", block_bytes,
                              [&](FirstError* e) { psync_blocks(rig.psync_fd, rig.blocks, region, false, e); }, out));
  for (const uint32_t qd : kQueueDepths) {
    auto requests = block_requests(rig.blocks, region, /*write=*/false);
    KVT_RETURN_IF_ERROR(measure(plan, "uring_rand_block_read_qd" + std::to_string(qd), "psync_rand_block_read_32threads",
                                block_bytes, [&](FirstError* e) { uring_run(rig.uring.depth(qd), requests, e); }, out));
  }
  KVT_RETURN_IF_ERROR(measure(plan, "psync_seq_read_1m", "", block_bytes, [&](FirstError* e) {
    psync_sequential(rig.psync_fd, block_bytes, plan.file_bytes, region, e);
  }, out));
  auto sequential = sequential_requests(block_bytes, plan.file_bytes, region);
  KVT_RETURN_IF_ERROR(measure(plan, "uring_seq_read_1m_qd32", "psync_seq_read_1m", block_bytes,
                              [&](FirstError* e) { uring_run(rig.uring.depth(kSeqQueueDepth), sequential, e); }, out));
  // The drive's read ceiling on this machine: large sequential requests at
  // the deepest queue; every read figure above is bounded by it.
  KVT_RETURN_IF_ERROR(measure(plan, "ceiling_seq_read_1m_qd64", "", block_bytes,
                              [&](FirstError* e) { uring_run(rig.uring.depth(64), sequential, e); }, out));
  KVT_RETURN_IF_ERROR(measure(plan, "psync_block_write_32threads", "", block_bytes,
                              [&](FirstError* e) { psync_blocks(rig.psync_fd, rig.blocks, region, true, e); }, out));
  auto writes = block_requests(rig.blocks, region, /*write=*/true);
  KVT_RETURN_IF_ERROR(measure(plan, "uring_block_write_qd32", "psync_block_write_32threads", block_bytes,
                              [&](FirstError* e) { uring_run(rig.uring.depth(kSeqQueueDepth), writes, e); }, out));
  return measure_grid(plan, rig, quick, out);
}

nlohmann::json make_config(const SuiteArgs& args, const Plan& plan, Rig& rig) {
  nlohmann::json devices = nlohmann::json::array();
  bool fixed = true;
  for (const auto& d : rig.uring.by_depth) {
    devices.push_back(d->describe());
    fixed = fixed && d->describe().find("fixed buffers") != std::string::npos;
  }
  return {{"dir", args.dir},
          {"fs_type", fs_type(args.dir)},
          {"file_bytes", plan.file_bytes},
          {"block_bytes", kBlockBytes},
          {"seq_request_bytes", kSeqBytes},
          {"blocks_per_repeat", plan.blocks_per_repeat},
          {"bytes_per_repeat", plan.blocks_per_repeat * kBlockBytes},
          {"repeats", plan.repeats},
          {"warmup", plan.warmup},
          {"statistic", "median"},
          {"io_mode", fixed ? "O_DIRECT, fixed buffers" : "O_DIRECT, plain buffers"},
          {"uring_devices", devices},
          {"psync", "pread/pwrite with O_DIRECT; 32 std::threads for random blocks, 1 thread for sequential"},
          {"block_list", "uniform random 32 KiB-aligned blocks over the whole file (seed " +
                             std::to_string(kBlockListSeed) + "), the same list for io_uring and psync"},
          {"page_cache", "kept out by O_DIRECT (dropping caches would need root); every figure reads the device"}};
}

}  // namespace

int run_storage(const SuiteArgs& args) {
  const Plan plan = plan_for(args);
  struct statvfs vfs{};
  if (::statvfs(args.dir.c_str(), &vfs) != 0) return fail("cannot use --dir " + args.dir + ": " + std::strerror(errno));
  const uint64_t free_bytes = uint64_t{vfs.f_bavail} * vfs.f_frsize;
  if (free_bytes < plan.file_bytes)
    return fail(args.dir + " has " + std::to_string(free_bytes) + " bytes free; the storage benchmark needs " +
                std::to_string(plan.file_bytes) + " bytes (" + (args.quick ? "--quick: 1 GiB" : "8 GiB; --quick needs 1 GiB") +
                "); choose another --dir");
  RemoveOnExit guard;
  Rig rig;
  if (Status s = prepare(args, plan, &guard, &rig); !s.ok())
    return fail(s.to_string() + " (the storage benchmark measures O_DIRECT I/O on --dir " + args.dir + ")");
  std::vector<Figure> figures;
  if (Status s = measure_all(plan, rig, args.quick, &figures); !s.ok()) return fail(s.to_string());
  Report report("storage", make_config(args, plan, rig));
  // measure_grid's figures (1 MiB reads at QD1/8, every write but 32 KiB at QD32).
  report.set_config("grid_bytes_per_repeat", grid_blocks_per_repeat(plan, args.quick) * kBlockBytes);
  for (const Figure& f : figures) report.add(f.name, f.gbps, "GB/s", f.baseline);
  report.set_config("h2d", add_h2d_results(report, args));
  report.print(args);
  return 0;
}

}  // namespace kvtier::bench
