// decode_kernel instantiations for head dim 64 (GQA groups 1, 2, 4, 8).
#include "decode.cuh"

namespace kvtier::gpu::decode_detail {
KVT_DECODE_INSTANTIATE(64, 1)
KVT_DECODE_INSTANTIATE(64, 2)
KVT_DECODE_INSTANTIATE(64, 4)
KVT_DECODE_INSTANTIATE(64, 8)
}  // namespace kvtier::gpu::decode_detail
