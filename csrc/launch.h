// Host entry points of the kernels (torch-free). Each is instantiated for the head dims of
// kHeadDims, the two 16-bit dtypes and both feature switches in the fwd_hdim*.cu / bwd_hdim*.cu
// files.
#pragma once
#include <cuda_runtime.h>

#include "params.h"

namespace peer_attention {

// Head dims with their own kernels; any other size up to 256 runs in the next larger one, its
// extra channels zero-filled in shared memory.
constexpr int kHeadDims[] = {32, 64, 96, 128, 160, 192, 256};

inline int kernel_head_dim(int dim) {
  for (int d : kHeadDims) {
    if (dim <= d) return d;
  }
  return -1;
}

// FlashAttention's BOOL_SWITCH: runs the lambda-like expression with CONST_NAME a constexpr bool
// equal to COND (each branch instantiates its own template).
#define BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                     \
    if (COND) {                             \
      constexpr bool CONST_NAME = true;     \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr bool CONST_NAME = false;    \
      return __VA_ARGS__();                 \
    }                                       \
  }()

// Each kernel has three instantiations per head dim and dtype (FlashAttention's BOOL_SWITCH):
// - plain (kFeatures = kMask = false): no attn_mask, gate, bias, peer normalisation,
//   recompute, dmask or dbias (SDPA, causal or not, GQA, kv_lengths, several streams), that code
//   compiled out; the forward up to D = 128 is forward_plain.cuh's kernel;
// - features (kFeatures = true, kMask = false): gate, bias, peer normalisation, recompute,
//   dbias through warp-uniform runtime branches, the attn_mask code (per-score loads and the
//   dmask stores) compiled out;
// - features + mask (both true): everything, attn_mask and its gradient included.
// The forward up to D = 128 is instead forward_plain.cuh's kernel with one switch per feature
// (gate, bias, peer mode: run_forward_plain below); forward_kernel serves its attn_mask,
// recompute and scale <= 0 calls there.
// A variant is launched only for params it serves (the has_* flags of a kernel are the params'
// own where its switch is on). Separate files (fwd_hdim*_{plain,features,mask}.cu,
// bwd_hdim*_{plain,features,mask}.cu) that ninja builds in parallel. T: __half or __nv_bfloat16.
template <int D, typename T, bool kFeatures, bool kMask>
cudaError_t run_forward_variant(const AttentionParams& params, cudaStream_t stream);

// The fast forward up to D = 128 (forward_plain.cuh) with its feature switches: gate (joint
// mode), bias, peer mode (the gate applied at each peer's end); no attn_mask, no recompute.
// Instantiated per head dim in fwd_hdim*_plain.cu (all false), fwd_hdim*_joint.cu (gate, bias,
// gate + bias) and fwd_hdim*_peer.cu (peer mode, with or without bias).
template <int D, typename T, bool kGate, bool kBias, bool kPeer>
cudaError_t run_forward_plain(const AttentionParams& params, cudaStream_t stream);

template <int D, typename T, bool kFeatures, bool kMask>
cudaError_t run_backward_dq_variant(const AttentionParams& params, cudaStream_t stream);

template <int D, typename T, bool kFeatures, bool kMask>
cudaError_t run_backward_dkdv_variant(const AttentionParams& params, cudaStream_t stream);

// FlashAttention-2's fused backward (bwd_fused_kernel, backward.cuh) for the plain path at
// D <= kFusedBackwardMaxDim: dK/dV into dk_accum/dv_accum as dkdv_kernel, dQ unscaled into
// p.dq_accum by float32 atomics (so not under torch.use_deterministic_algorithms(True), where
// the binding keeps dq_kernel + dkdv_kernel). PEER_ATTENTION_FUSED_BACKWARD=0 at compile time
// turns it off (the split kernels everywhere).
#ifndef PEER_ATTENTION_FUSED_BACKWARD
#define PEER_ATTENTION_FUSED_BACKWARD 1
#endif
constexpr int kFusedBackwardMaxDim = PEER_ATTENTION_FUSED_BACKWARD ? 128 : 0;
template <int D, typename T>
cudaError_t run_backward_fused(const AttentionParams& params, cudaStream_t stream);

// the fast forward up to D = 128 (forward_plain.cuh) folds the scale into the exponent, which
// needs 0 < scale * log2(e) < inf; any other scale, an attn_mask or recompute takes the general
// kernel (forward_kernel)
inline bool forward_fast_serves(const AttentionParams& p) {
  return p.mask == nullptr && !p.recompute && p.scale_log2 > 0.f && p.scale_log2 <= 3.4e38f;
}
inline bool forward_needs_features(const AttentionParams& p) {
  return p.mask != nullptr || p.gate != nullptr || p.bias != nullptr || p.per_peer ||
         p.recompute || !(p.scale_log2 > 0.f && p.scale_log2 <= 3.4e38f);
}

inline bool dq_needs_features(const AttentionParams& p) {
  return p.mask != nullptr || p.gate != nullptr || p.bias != nullptr || p.per_peer ||
         p.dmask != nullptr || p.dbias != nullptr;
}

inline bool dkdv_needs_features(const AttentionParams& p) {
  return p.mask != nullptr || p.gate != nullptr || p.bias != nullptr || p.per_peer;
}

// the fused backward serves the plain path (neither dQ nor dK/dV needs a feature)
inline bool fused_backward_serves(const AttentionParams& p, int kernel_head_dim) {
  return kernel_head_dim <= kFusedBackwardMaxDim && !dq_needs_features(p) &&
         !dkdv_needs_features(p);
}

// the mask variants: attn_mask (forward, dK/dV), attn_mask or its gradient (dQ)
template <int D, typename T>
cudaError_t run_forward(const AttentionParams& params, cudaStream_t stream) {
  if constexpr (D <= 128) {  // each feature a compile-time switch of the fast kernel
    if (forward_fast_serves(params)) {
      const bool bias = params.bias != nullptr;
      if (params.per_peer) {
        return BOOL_SWITCH(bias, kBias, [&] {
          return run_forward_plain<D, T, false, kBias, true>(params, stream);
        });
      }
      return BOOL_SWITCH(bias, kBias, [&] {
        return BOOL_SWITCH(params.gate != nullptr, kGate, [&] {
          return run_forward_plain<D, T, kGate, kBias, false>(params, stream);
        });
      });
    }
  } else if (!forward_needs_features(params)) {
    return run_forward_variant<D, T, false, false>(params, stream);
  }
  return BOOL_SWITCH(params.mask != nullptr, kMask,
                     [&] { return run_forward_variant<D, T, true, kMask>(params, stream); });
}

template <int D, typename T>
cudaError_t run_backward_dq(const AttentionParams& params, cudaStream_t stream) {
  if (!dq_needs_features(params)) return run_backward_dq_variant<D, T, false, false>(params, stream);
  return BOOL_SWITCH(params.mask != nullptr || params.dmask != nullptr, kMask,
                     [&] { return run_backward_dq_variant<D, T, true, kMask>(params, stream); });
}

template <int D, typename T>
cudaError_t run_backward_dkdv(const AttentionParams& params, cudaStream_t stream) {
  if (!dkdv_needs_features(params)) {
    return run_backward_dkdv_variant<D, T, false, false>(params, stream);
  }
  return BOOL_SWITCH(params.mask != nullptr, kMask,
                     [&] { return run_backward_dkdv_variant<D, T, true, kMask>(params, stream); });
}

// delta[row] = sum_c dout[row, c] * out[row, c] over rows x cols contiguous matrices.
template <typename T>
cudaError_t run_delta_rowdot(const void* dout, const void* out, float* delta, int64_t rows,
                             int cols, cudaStream_t stream);

// cudaSuccess when this build holds machine code or PTX the current device can run, else the
// error a launch would give (cudaErrorNoKernelImageForDevice).
cudaError_t probe_kernel_image();

}  // namespace peer_attention
