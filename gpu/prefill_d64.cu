// Block-sparse prefill attention for head dim 64, every supported GQA group
// (the kernel template is in prefill.cuh).
#include "prefill.cuh"

namespace kvtier::gpu::prefill {

template Status launch_prefill<64, 1>(const PrefillArgs&, cudaStream_t);
template Status launch_prefill<64, 2>(const PrefillArgs&, cudaStream_t);
template Status launch_prefill<64, 4>(const PrefillArgs&, cudaStream_t);
template Status launch_prefill<64, 8>(const PrefillArgs&, cudaStream_t);

}  // namespace kvtier::gpu::prefill
