// Backward kernel instantiations for head dim 64, the plain path (no mask, gate, bias, peer mode): one file per head dim and
// switch, so that ninja builds them in parallel.
#include "backward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_backward_dq_variant<64, __half, false, false>(const AttentionParams&,
                                                                 cudaStream_t);
template cudaError_t run_backward_dq_variant<64, __nv_bfloat16, false, false>(const AttentionParams&,
                                                                        cudaStream_t);
template cudaError_t run_backward_dkdv_variant<64, __half, false, false>(const AttentionParams&,
                                                                   cudaStream_t);
template cudaError_t run_backward_dkdv_variant<64, __nv_bfloat16, false, false>(
    const AttentionParams&, cudaStream_t);
template cudaError_t run_backward_fused<64, __half>(const AttentionParams&, cudaStream_t);
template cudaError_t run_backward_fused<64, __nv_bfloat16>(const AttentionParams&, cudaStream_t);
}  // namespace peer_attention
