// Forward kernel instantiations for head dim 32, joint normalisation with a gate, a bias or
// both (MMDiT): forward_plain.cuh's kernel with those switches on. One file per head dim and
// switch group, so that ninja builds them in parallel.
#include "forward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_forward_plain<32, __half, true, false, false>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __nv_bfloat16, true, false, false>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __half, false, true, false>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __nv_bfloat16, false, true, false>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __half, true, true, false>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __nv_bfloat16, true, true, false>(const AttentionParams&,
                                                      cudaStream_t);
}  // namespace peer_attention
