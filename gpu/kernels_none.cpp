// CPU-only build: the GPU kernels, context and GEMM exist as interfaces whose
// every call says that this build has no CUDA support.
#include <memory>

#include "kvtier/gpu/cuda_context.h"
#include "kvtier/gpu/gemm.h"
#include "kvtier/gpu/kernels.h"

namespace kvtier::gpu {
namespace {
Status no_cuda() {
  return unavailable("kvtier was built without CUDA (nvcc not found or -DKVTIER_ENABLE_CUDA=OFF); rebuild with the CUDA toolkit installed");
}
}  // namespace

Result<DecodeLaunchPlan> decode_launch_plan(const DecodeArgs&) { return no_cuda(); }
uint64_t decode_workspace_bytes(const DecodeArgs&) { return 0; }
Status decode_attention(const DecodeArgs&, void*, uint64_t, cudaStream_t) { return no_cuda(); }
Status merge_partials(const MergeArgs&, cudaStream_t) { return no_cuda(); }
Status append_kv(const AppendArgs&, cudaStream_t) { return no_cuda(); }
Status append_kv_range(const AppendRangeArgs&, cudaStream_t) { return no_cuda(); }
Status build_summaries(const SummaryArgs&, cudaStream_t) { return no_cuda(); }
Status score_summaries(const ScoreArgs&, cudaStream_t) { return no_cuda(); }
Status prefill_attention(const PrefillArgs&, cudaStream_t) { return no_cuda(); }

Event::~Event() = default;
Event::Event(Event&& o) noexcept : event_(o.event_) { o.event_ = nullptr; }
Event& Event::operator=(Event&& o) noexcept {
  std::swap(event_, o.event_);
  return *this;
}
Result<Event> Event::create() { return no_cuda(); }
Status Event::record(cudaStream_t) { return no_cuda(); }
Status Event::wait_on(cudaStream_t) const { return no_cuda(); }
Status Event::synchronize() const { return no_cuda(); }
Result<float> Event::elapsed_ms(const Event&, const Event&) { return no_cuda(); }

Result<std::unique_ptr<CudaContext>> CudaContext::create(int) { return no_cuda(); }
CudaContext::~CudaContext() = default;
Result<DeviceMemory> CudaContext::allocate(uint64_t) { return no_cuda(); }
Status CudaContext::upload(void*, const void*, uint64_t) { return no_cuda(); }
Status CudaContext::download(void*, const void*, uint64_t) { return no_cuda(); }
Status CudaContext::memset(void*, int, uint64_t) { return no_cuda(); }
Status CudaContext::copy_async(void*, const void*, uint64_t, cudaStream_t) { return no_cuda(); }
Status CudaContext::synchronize(cudaStream_t) const { return no_cuda(); }
Status CudaContext::synchronize_device() const { return no_cuda(); }
Status CudaContext::make_current() const { return no_cuda(); }

Result<std::unique_ptr<Gemm>> Gemm::create() { return no_cuda(); }
Gemm::~Gemm() = default;
Status Gemm::bf16_nt(const bf16*, uint64_t, const bf16*, uint64_t, float*, uint64_t, uint32_t, uint32_t, uint32_t,
                     float, cudaStream_t) {
  return no_cuda();
}

}  // namespace kvtier::gpu
