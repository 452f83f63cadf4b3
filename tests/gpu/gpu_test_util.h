// Helpers shared by the GPU kernel suites: a CUDA context or exit 77, typed
// device buffers that upload/download through it, and poison checks.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvtier/gpu/cuda_context.h"
#include "skip.h"

namespace kvtier::test {

// The device context, or exit 77 (skipped) when this machine has no usable
// GPU. Any other failure to create it (a broken driver state, a stream that
// cannot be made) is a test failure, not a skip.
inline gpu::CudaContext& cuda_context_or_skip() {
  static std::unique_ptr<gpu::CudaContext> ctx = [] {
    auto made = gpu::CudaContext::create(0);
    require(made.ok() || made.status().code() != StatusCode::kUnavailable, made.status().to_string());
    if (!made.ok()) {
      std::fprintf(stderr, "cannot create the CUDA context: %s\n", made.status().to_string().c_str());
      std::exit(1);
    }
    return std::move(made).value();
  }();
  return *ctx;
}

// n elements of T in device memory.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer(gpu::CudaContext& ctx, size_t n) : ctx_(&ctx), n_(n) {
    auto mem = ctx.allocate(std::max<size_t>(n, 1) * sizeof(T));
    REQUIRE_MESSAGE(mem.ok(), mem.status().to_string());
    mem_ = std::move(mem).value();
  }
  DeviceBuffer(gpu::CudaContext& ctx, const std::vector<T>& host) : DeviceBuffer(ctx, host.size()) { upload(host); }
  T* get() const { return reinterpret_cast<T*>(mem_.data()); }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    REQUIRE(host.size() == n_);
    const Status s = ctx_->upload(get(), host.data(), n_ * sizeof(T));
    REQUIRE_MESSAGE(s.ok(), s.to_string());
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    const Status s = ctx_->download(host.data(), get(), n_ * sizeof(T));
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    return host;
  }
  // Fills the buffer with 0xFF bytes: NaN for fp32, NaN for bf16 (0xFFFF).
  void poison() {
    const Status s = ctx_->memset(get(), 0xFF, n_ * sizeof(T));
    REQUIRE_MESSAGE(s.ok(), s.to_string());
  }

 private:
  gpu::CudaContext* ctx_;
  size_t n_;
  DeviceMemory mem_;
};

// Waits for the device and fails the test with the asynchronous error, if any.
inline void sync_or_fail(gpu::CudaContext& ctx) {
  const Status s = ctx.synchronize_device();
  REQUIRE_MESSAGE(s.ok(), s.to_string());
}

}  // namespace kvtier::test
