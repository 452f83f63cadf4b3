// bf16 GEMMs through cuBLAS (prefill scoring: a query block against all
// summaries; also the bench's tensor-core ceiling). Owns one cuBLAS handle.
// Without a CUDA build create() returns an unavailable Status.
#pragma once

#include <cstdint>
#include <memory>

#include "kvtier/core/bf16.h"
#include "kvtier/core/status.h"
#include "kvtier/gpu/kernels.h"  // cudaStream_t

namespace kvtier::gpu {

class Gemm {
 public:
  static Result<std::unique_ptr<Gemm>> create();
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // C[m][n] (fp32, row-major, leading dimension ldc) = alpha * A[m][k] . B[n][k]^T
  // with A and B bf16 row-major (leading dimensions lda, ldb), fp32 accumulation
  // on tensor cores, on `stream`. Errors name the cuBLAS status.
  Status bf16_nt(const bf16* a, uint64_t lda, const bf16* b, uint64_t ldb, float* c, uint64_t ldc, uint32_t m,
                 uint32_t n, uint32_t k, float alpha, cudaStream_t stream);

 private:
  Gemm() = default;
  void* handle_ = nullptr;  // cublasHandle_t
};

}  // namespace kvtier::gpu
