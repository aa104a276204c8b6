// Backward kernel instantiations for head dim 64, every feature and attn_mask (runtime branches): one file per head dim and
// switch, so that ninja builds them in parallel.
#include "backward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_backward_dq_variant<64, __half, true, true>(const AttentionParams&,
                                                                 cudaStream_t);
template cudaError_t run_backward_dq_variant<64, __nv_bfloat16, true, true>(const AttentionParams&,
                                                                        cudaStream_t);
template cudaError_t run_backward_dkdv_variant<64, __half, true, true>(const AttentionParams&,
                                                                   cudaStream_t);
template cudaError_t run_backward_dkdv_variant<64, __nv_bfloat16, true, true>(
    const AttentionParams&, cudaStream_t);
}  // namespace peer_attention
