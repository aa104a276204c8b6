// The attention problem as the kernels see it: raw pointers, strides and sizes (no torch).
// Mirrors peer_attention/problem.py: S query/key streams packed along the sequence dim.
#pragma once
#include <cstdint>

namespace peer_attention {

constexpr int kMaxStreams = 16;

struct AttentionParams {
  // q (B, Hq, Tq, head_dim), k (B, H, Tk, head_dim), v (B, H, Tk, value_dim): channels are
  // contiguous, rows 16-byte aligned; strides in elements, [batch, head, row].
  const void* q;
  const void* k;
  const void* v;
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int batch, q_heads, kv_heads;
  int head_dim, value_dim;  // multiples of 8 (the binding pads), at most the kernel's D
  int total_q, total_kv;    // Tq, Tk
  int num_streams;          // S <= kMaxStreams
  int q_offsets[kMaxStreams + 1];   // prefix sums of q_lens
  int kv_offsets[kMaxStreams + 1];  // prefix sums of kv_lens
  int q_tile_offsets[kMaxStreams + 1];   // filled by the launcher for its tile size
  int kv_tile_offsets[kMaxStreams + 1];
  uint32_t peer_rows[kMaxStreams];  // bit p of peer_rows[s]: stream s attends to stream p

  const float* gate;      // (B, S, S, Hq, value_dim) float32, contiguous, or null
  const float* bias;      // (B, S, S, Hq) float32, contiguous, or null
  const int* kv_lengths;  // (B, S) int32, or null
  // attn_mask as float32 added to the scores (-inf = may not attend), indexed [b, h, packed query
  // row, packed key row] with these strides (0 on broadcast dims), or null
  const float* mask;
  int64_t mask_strides[4];
  bool causal;            // causal on the self pairs
  // causal alignment on the self pairs: off = kv_len_s - q_len_s (bottom-right) or 0 (top-left);
  // key j of stream s is visible to its query i iff j <= i + off
  bool bottom_right;
  bool per_peer;          // normalize == "peer"
  float scale;
  float scale_log2;       // scale * log2(e)

  // forward outputs (contiguous): out (B, Hq, Tq, value_dim) in the input dtype (joint), or
  // out_accum float32 of that shape (peer, zero-filled by the caller); lse float32 natural log,
  // (B, Hq, Tq) joint / (B, Hq, S, Tq) peer (peer: -inf-filled by the caller).
  void* out;
  float* out_accum;
  float* lse;

  // backward. recompute: the forward kernel re-runs with the saved lse to get, per peer,
  // U_p = sum_j P_pj v_pj, and from it delta (peer mode) and dgate.
  bool recompute;
  const void* dout;  // (B, Hq, Tq, value_dim) contiguous, input dtype
  float* delta;      // (B, Hq, Tq) joint / (B, Hq, S, Tq) peer
  float* dgate;      // (B, S, S, Hq, value_dim) float32 accumulator (zeroed), or null
  float* dbias;      // (B, S, S, Hq) float32 accumulator (zeroed), or null
  // float32 (zeroed), indexed [b, h, packed query row, packed key row] with dmask_strides, into
  // which dS of every visited score is added: the mask's own shape (strides 0 on the dims it is
  // broadcast along), or dense (B, Hq, Tq, Tk) (one add per element); or null
  float* dmask;
  int64_t dmask_strides[4];
  void* dq;          // (B, Hq, Tq, head_dim) contiguous, input dtype
  float* dq_accum;   // bwd_fused_kernel: (B, Hq, Tq, D) float32 (zeroed; D = the kernel's head
                     // dim), dS K unscaled
  float* dk_accum;   // (B, H, Tk, head_dim) float32 (zeroed)
  float* dv_accum;   // (B, H, Tk, value_dim) float32 (zeroed)
};

}  // namespace peer_attention
