// The parts of `kvtier bench gpu`, one per kernel family; each adds its
// results (and the baselines they are measured against, in the same run) to
// the report. Timing is by CUDA events: median of the repeats after warm-up.
#pragma once

#include <functional>
#include <string>

#include "harness.h"
#include "kvtier/core/status.h"
#include "kvtier/gpu/cuda_context.h"

namespace kvtier::bench {

// Runs one part of the suite; a failure becomes a config note ("<name>_error")
// instead of ending the suite (gpu_bench.cpp).
void run_part(Report& report, const std::string& name, const std::function<Status()>& part);

// hbm_copy_bw, decode_sparse_b1/b4/b16 (+ batch-1 latency) and merge (gpu_decode_bench.cpp).
void add_decode_results(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args);
// cublas_bf16_gemm and prefill_block_sparse (gpu_prefill_bench.cpp).
void add_prefill_results(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args);
// h2d_single_copy_32mib, gather_blocks, append and summary kernels (gpu_gather_bench.cpp).
void add_gather_results(Report& report, gpu::CudaContext& ctx, const SuiteArgs& args);

}  // namespace kvtier::bench
