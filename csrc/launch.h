// Host entry points of the kernels (torch-free). Each is instantiated for the head dims of
// kHeadDims and the two 16-bit dtypes in the fwd_hdim*.cu / bwd_hdim*.cu files.
#pragma once
#include <cuda_runtime.h>

#include "params.h"

namespace peer_attention {

// Head dims with their own kernels; any other size up to 256 runs in the next larger one, its
// extra channels zero-filled in shared memory.
constexpr int kHeadDims[] = {32, 64, 96, 128, 256};

inline int kernel_head_dim(int dim) {
  for (int d : kHeadDims) {
    if (dim <= d) return d;
  }
  return -1;
}

// T is __half or __nv_bfloat16.
template <int D, typename T>
cudaError_t run_forward(const AttentionParams& params, cudaStream_t stream);

template <int D, typename T>
cudaError_t run_backward_dq(const AttentionParams& params, cudaStream_t stream);

template <int D, typename T>
cudaError_t run_backward_dkdv(const AttentionParams& params, cudaStream_t stream);

// delta[row] = sum_c dout[row, c] * out[row, c] over rows x cols contiguous matrices.
template <typename T>
cudaError_t run_delta_rowdot(const void* dout, const void* out, float* delta, int64_t rows,
                             int cols, cudaStream_t stream);

// cudaSuccess when this build holds machine code or PTX the current device can run, else the
// error a launch would give (cudaErrorNoKernelImageForDevice).
cudaError_t probe_kernel_image();

}  // namespace peer_attention
