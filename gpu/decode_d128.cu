// decode_kernel instantiations for head dim 128 (GQA groups 1, 2, 4, 8).
#include "decode.cuh"

namespace kvtier::gpu::decode_detail {
KVT_DECODE_INSTANTIATE(128, 1)
KVT_DECODE_INSTANTIATE(128, 2)
KVT_DECODE_INSTANTIATE(128, 4)
KVT_DECODE_INSTANTIATE(128, 8)
}  // namespace kvtier::gpu::decode_detail
