// Gemm (gemm.h): bf16 x bf16 -> fp32 products through cuBLAS.
#include "kvtier/gpu/gemm.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <string>

#include "cuda_check.h"

namespace kvtier::gpu {
namespace {

constexpr std::string_view kWhat = "Gemm::bf16_nt";

Status cublas_failure(const char* call, cublasStatus_t st) {
  return internal_error(std::string(call) + " failed: " + cublasGetStatusName(st) + " (" + cublasGetStatusString(st) +
                        ")");
}

cublasHandle_t as_handle(void* h) { return static_cast<cublasHandle_t>(h); }

Status check_nt(const void* a, uint64_t lda, const void* b, uint64_t ldb, const void* c, uint64_t ldc, uint32_t m,
                uint32_t n, uint32_t k) {
  if (a == nullptr || b == nullptr || c == nullptr)
    return invalid_argument(std::string(kWhat) + ": " + (a == nullptr ? "a" : b == nullptr ? "b" : "c") + " is null");
  if (m == 0 || m > INT_MAX) return invalid_field(kWhat, "m", m, "must be in 1..2^31-1");
  if (n == 0 || n > INT_MAX) return invalid_field(kWhat, "n", n, "must be in 1..2^31-1");
  if (k == 0 || k > INT_MAX) return invalid_field(kWhat, "k", k, "must be in 1..2^31-1");
  if (lda < k || lda > INT_MAX) return invalid_field(kWhat, "lda", lda, "must be in k=" + std::to_string(k) + "..2^31-1");
  if (ldb < k || ldb > INT_MAX) return invalid_field(kWhat, "ldb", ldb, "must be in k=" + std::to_string(k) + "..2^31-1");
  if (ldc < n || ldc > INT_MAX) return invalid_field(kWhat, "ldc", ldc, "must be in n=" + std::to_string(n) + "..2^31-1");
  return Status::ok_status();
}

}  // namespace

Result<std::unique_ptr<Gemm>> Gemm::create() {
  cublasHandle_t h = nullptr;
  const cublasStatus_t st = cublasCreate(&h);
  if (st != CUBLAS_STATUS_SUCCESS) return cublas_failure("cublasCreate", st);
  std::unique_ptr<Gemm> g(new Gemm());
  g->handle_ = h;
  return Result<std::unique_ptr<Gemm>>(std::move(g));
}

Gemm::~Gemm() {
  if (handle_ != nullptr) cublasDestroy(as_handle(handle_));
}

Status Gemm::bf16_nt(const bf16* a, uint64_t lda, const bf16* b, uint64_t ldb, float* c, uint64_t ldc, uint32_t m,
                     uint32_t n, uint32_t k, float alpha, cudaStream_t stream) {
  KVT_RETURN_IF_ERROR(check_nt(a, lda, b, ldb, c, ldc, m, n, k));
  cublasHandle_t h = as_handle(handle_);
  cublasStatus_t st = cublasSetStream(h, stream);
  if (st != CUBLAS_STATUS_SUCCESS) return cublas_failure("cublasSetStream", st);
  // cuBLAS is column-major. Row-major C[m][n] is column-major C^T (n x m),
  // and C^T = B . A^T, where row-major B[n][k] read column-major is B^T
  // (k x n), hence op T, and row-major A[m][k] read column-major is A^T
  // (k x m), hence op N.
  const float beta = 0.f;
  st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha,
                    b, CUDA_R_16BF, static_cast<int>(ldb), a, CUDA_R_16BF, static_cast<int>(lda), &beta, c, CUDA_R_32F,
                    static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS)
    return cublas_failure("cublasGemmEx", st)
        .with_context("C[" + std::to_string(m) + "][" + std::to_string(n) + "] k=" + std::to_string(k));
  return Status::ok_status();
}

}  // namespace kvtier::gpu
