// Forward kernel instantiations for head dim 32, per-peer normalisation (the gate applied at
// each peer's end), with or without a bias: forward_plain.cuh's kernel. One file per head dim
// and switch group, so that ninja builds them in parallel.
#include "forward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_forward_plain<32, __half, false, false, true>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __nv_bfloat16, false, false, true>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __half, false, true, true>(const AttentionParams&,
                                                      cudaStream_t);
template cudaError_t run_forward_plain<32, __nv_bfloat16, false, true, true>(const AttentionParams&,
                                                      cudaStream_t);
}  // namespace peer_attention
