// Backward kernel instantiations for head dim 128 (one file per head dim: parallel builds).
#include "backward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_backward_dq<128, __half>(const AttentionParams&, cudaStream_t);
template cudaError_t run_backward_dq<128, __nv_bfloat16>(const AttentionParams&, cudaStream_t);
template cudaError_t run_backward_dkdv<128, __half>(const AttentionParams&, cudaStream_t);
template cudaError_t run_backward_dkdv<128, __nv_bfloat16>(const AttentionParams&, cudaStream_t);
}  // namespace peer_attention
