// CudaContext and Event against their contract: round trips through device
// memory, memset, asynchronous copies in both directions ordered by events,
// event timing, and out-of-memory as a Status that names the bytes asked and
// the bytes free. Exits 77 (skipped) without a CUDA build or a GPU.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "gpu_test_util.h"
#include "random.h"
#include "skip.h"

using namespace kvtier;
using test::cuda_context_or_skip;

namespace {

std::vector<uint8_t> random_bytes(size_t n, uint64_t salt) {
  auto gen = test::rng(salt);
  std::vector<uint8_t> out(n);
  for (uint8_t& b : out) b = static_cast<uint8_t>(gen());
  return out;
}

gpu::Event make_event() {
  auto e = gpu::Event::create();
  REQUIRE_MESSAGE(e.ok(), e.status().to_string());
  return std::move(e).value();
}

void require_ok(const Status& s) { REQUIRE_MESSAGE(s.ok(), s.to_string()); }

}  // namespace

TEST_CASE("create names the device and makes two distinct streams") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  CHECK(ctx.device() == 0);
  CHECK_FALSE(ctx.name().empty());
  CHECK(ctx.compute_stream() != nullptr);
  CHECK(ctx.copy_stream() != nullptr);
  CHECK(ctx.compute_stream() != ctx.copy_stream());
  CHECK(gpu::CudaContext::create(1 << 20).status().code() == StatusCode::kUnavailable);
}

TEST_CASE("allocate, upload and download round-trip bit-exact at odd sizes") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  for (const size_t n : {size_t{1}, size_t{17}, size_t{4097}, size_t{3} << 20}) {
    CAPTURE(n);
    const std::vector<uint8_t> host = random_bytes(n, n);
    auto mem = ctx.allocate(n);
    REQUIRE_MESSAGE(mem.ok(), mem.status().to_string());
    CHECK(mem->bytes() == n);
    require_ok(ctx.upload(mem->data(), host.data(), n));
    std::vector<uint8_t> back(n, 0);
    require_ok(ctx.download(back.data(), mem->data(), n));
    CHECK(back == host);
  }
}

TEST_CASE("memset writes exactly the range asked") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const size_t n = 1000;
  auto mem = ctx.allocate(n);
  REQUIRE(mem.ok());
  require_ok(ctx.memset(mem->data(), 0x00, n));
  require_ok(ctx.memset(mem->data() + 17, 0xAB, 97));
  std::vector<uint8_t> back(n, 0x55);
  require_ok(ctx.download(back.data(), mem->data(), n));
  for (size_t i = 0; i < n; ++i) {
    const uint8_t want = i >= 17 && i < 17 + 97 ? 0xAB : 0x00;
    if (back[i] != want) FAIL_CHECK("byte ", i, " is ", int(back[i]), ", expected ", int(want));
  }
}

TEST_CASE("copy_async in every direction, ordered across streams by an event") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const size_t n = (size_t{8} << 20) + 48;  // large enough that a missing wait would show
  const std::vector<uint8_t> host = random_bytes(n, 7);
  auto a = ctx.allocate(n), b = ctx.allocate(n);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  require_ok(ctx.memset(b->data(), 0xFF, n));

  // Host -> device and device -> device on the compute stream, then device
  // -> host on the copy stream once an event says the compute stream is done.
  gpu::Event done = make_event();
  require_ok(ctx.copy_async(a->data(), host.data(), n, ctx.compute_stream()));
  require_ok(ctx.copy_async(b->data(), a->data(), n, ctx.compute_stream()));
  require_ok(done.record(ctx.compute_stream()));
  require_ok(done.wait_on(ctx.copy_stream()));
  std::vector<uint8_t> back(n, 0);
  require_ok(ctx.copy_async(back.data(), b->data(), n, ctx.copy_stream()));
  require_ok(ctx.synchronize(ctx.copy_stream()));
  CHECK(back == host);
  require_ok(done.synchronize());
  require_ok(ctx.synchronize_device());
}

TEST_CASE("events time work on a stream") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  const size_t n = size_t{64} << 20;
  auto a = ctx.allocate(n), b = ctx.allocate(n);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  gpu::Event start = make_event(), stop = make_event();
  require_ok(start.record(ctx.compute_stream()));
  for (int i = 0; i < 4; ++i) require_ok(ctx.copy_async(b->data(), a->data(), n, ctx.compute_stream()));
  require_ok(stop.record(ctx.compute_stream()));
  require_ok(stop.synchronize());
  auto ms = gpu::Event::elapsed_ms(start, stop);
  REQUIRE_MESSAGE(ms.ok(), ms.status().to_string());
  CHECK(*ms > 0.f);
  CHECK(*ms < 10'000.f);

  // Events are move-only handles: the moved-to one still times.
  gpu::Event moved = std::move(stop);
  CHECK(stop.get() == nullptr);
  CHECK(moved.get() != nullptr);
  auto again = gpu::Event::elapsed_ms(start, moved);
  REQUIRE(again.ok());
  CHECK(*again == *ms);
}

TEST_CASE("out of GPU memory is a Status naming the bytes asked and free, and the context survives it") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  if (test::quick_sweep()) {
    // compute-sanitizer counts the intended cudaMalloc failure as an error.
    MESSAGE("skipped under KVTIER_TEST_QUICK (the sanitizer sweep): it provokes a CUDA API error on purpose");
    return;
  }
  const uint64_t asked = uint64_t{1} << 44;  // 16 TiB: more than any GPU has
  auto mem = ctx.allocate(asked);
  REQUIRE_FALSE(mem.ok());
  const Status& s = mem.status();
  CHECK(s.code() == StatusCode::kOutOfMemory);
  CHECK_MESSAGE(s.message().find("asked " + std::to_string(asked) + " bytes") != std::string::npos, s.message());
  CHECK_MESSAGE(s.message().find("free of") != std::string::npos, s.message());
  CHECK_MESSAGE(s.message().find("GPU budget") != std::string::npos, s.message());

  auto small = ctx.allocate(4096);
  REQUIRE_MESSAGE(small.ok(), small.status().to_string());
  require_ok(ctx.memset(small->data(), 0, 4096));
  require_ok(ctx.synchronize_device());
}

TEST_CASE("bad arguments are invalid_argument, not crashes") {
  gpu::CudaContext& ctx = cuda_context_or_skip();
  CHECK(ctx.allocate(0).status().code() == StatusCode::kInvalidArgument);
  uint8_t byte = 0;
  CHECK(ctx.upload(nullptr, &byte, 1).code() == StatusCode::kInvalidArgument);
  CHECK(ctx.download(&byte, nullptr, 1).code() == StatusCode::kInvalidArgument);
  CHECK(ctx.memset(nullptr, 0, 1).code() == StatusCode::kInvalidArgument);
  CHECK(ctx.copy_async(nullptr, &byte, 1, ctx.copy_stream()).code() == StatusCode::kInvalidArgument);
  // Zero bytes is a no-op whatever the pointers.
  CHECK(ctx.upload(nullptr, nullptr, 0).ok());
  require_ok(ctx.synchronize_device());
}
