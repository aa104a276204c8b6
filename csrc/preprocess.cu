// Backward preprocess for joint normalisation: delta = rowsum(dO * O), one warp per row.
#include "kernel_common.cuh"
#include "launch.h"

namespace peer_attention {

template <typename T>
__global__ void delta_rowdot_kernel(const T* dout, const T* out, float* delta, int64_t rows,
                                    int cols) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float sum = 0.f;
  for (int c = lane; c < cols; c += 32)
    sum += static_cast<float>(dout[row * cols + c]) * static_cast<float>(out[row * cols + c]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

template <typename T>
cudaError_t run_delta_rowdot(const void* dout, const void* out, float* delta, int64_t rows,
                             int cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kRowsPerBlock = 8;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  delta_rowdot_kernel<T><<<static_cast<unsigned>(blocks), 32 * kRowsPerBlock, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(out), delta, rows, cols);
  return cudaGetLastError();
}

cudaError_t probe_kernel_image() {
  // every translation unit is compiled for the same architectures: one kernel answers for all
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, delta_rowdot_kernel<__half>);
}

template cudaError_t run_delta_rowdot<__half>(const void*, const void*, float*, int64_t, int,
                                              cudaStream_t);
template cudaError_t run_delta_rowdot<__nv_bfloat16>(const void*, const void*, float*, int64_t,
                                                     int, cudaStream_t);

}  // namespace peer_attention
