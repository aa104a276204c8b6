// Forward kernel instantiations for head dim 64 (one file per head dim: parallel builds).
#include "forward.cuh"
#include "launch.h"

namespace peer_attention {
template cudaError_t run_forward<64, __half>(const AttentionParams&, cudaStream_t);
template cudaError_t run_forward<64, __nv_bfloat16>(const AttentionParams&, cudaStream_t);
}  // namespace peer_attention
