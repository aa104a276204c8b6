// Forward kernel instantiations for head dim 32, every feature and attn_mask (runtime branches): one file per head dim and
// switch, so that ninja builds them in parallel.
#include "forward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_forward_variant<32, __half, true, true>(const AttentionParams&, cudaStream_t);
template cudaError_t run_forward_variant<32, __nv_bfloat16, true, true>(const AttentionParams&,
                                                                    cudaStream_t);
}  // namespace peer_attention
