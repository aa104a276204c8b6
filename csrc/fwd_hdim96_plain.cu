// Forward kernel instantiations for head dim 96, the plain path (no mask, gate, bias, peer
// mode): forward_plain.cuh's kernel with every feature switch off. One file per head dim and
// switch group, so that ninja builds them in parallel.
#include "forward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_forward_plain<96, __half, false, false, false>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<96, __nv_bfloat16, false, false, false>(const AttentionParams&,
                                                      cudaStream_t);
}  // namespace peer_attention
