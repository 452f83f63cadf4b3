// `kvtier bench gpu`: the GPU kernels of a decode step and of prefill against
// ceilings measured in the same run (device-to-device copy bandwidth, a large
// cuBLAS bf16 GEMM, one contiguous host-to-device copy). Needs a GPU; without
// one it prints a report with no results and a note saying why.
#include <iostream>

#include "gpu_suites.h"
#include "kvtier/gpu/cuda_context.h"
#include "suites.h"

namespace kvtier::bench {

void run_part(Report& report, const std::string& name, const std::function<Status()>& part) {
  const Status st = part();
  if (!st.ok()) report.set_config(name + "_error", st.to_string());
}

int run_gpu(const SuiteArgs& args) {
  Report report("gpu", {{"quick", args.quick}});
  auto ctx = gpu::CudaContext::create(0);
  if (!ctx.ok()) {
    report.set_config("note", "no GPU results: " + ctx.status().to_string());
    report.print(args);
    return 0;
  }
  report.set_config("device", (*ctx)->name());
  add_decode_results(report, **ctx, args);
  add_prefill_results(report, **ctx, args);
  add_gather_results(report, **ctx, args);
  report.print(args);
  return 0;
}

}  // namespace kvtier::bench
