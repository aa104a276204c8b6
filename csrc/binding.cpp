// Registers the CUDA kernels for the ops peer_attention::cuda_fwd / cuda_bwd (schemas, fake
// implementations and autograd live in peer_attention/ops.py) and turns tensors into
// AttentionParams. Importing the module peer_attention._C runs the registration.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"
#include "params.h"

namespace peer_attention {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr char kWho[] = "peer_attention cuda backend: ";

// The C++ side of the op schemas (peer_attention/ops.py's PROBLEM_SCHEMA), declared once for
// the CUDA kernels and the CPU argument checks: forward(FORWARD_ARGS) -> (out, lse),
// backward(BACKWARD_ARGS) -> (dq, dk, dv, dgate, dbias, dmask, dsinks).
#define FORWARD_ARGS                                                                            \
  const Tensor &q, const Tensor &k, const Tensor &v, at::IntArrayRef q_lens,                    \
      at::IntArrayRef kv_lens, at::IntArrayRef peers, const OptTensor &gate,                    \
      const OptTensor &bias, const OptTensor &kv_lengths, const OptTensor &attn_mask,           \
      const OptTensor &dropout_seed, double dropout_p, bool is_causal, double scale,            \
      c10::string_view normalize, int64_t window_left, int64_t window_right, bool bottom_right, \
      double softcap, const OptTensor &alibi_slopes, const OptTensor &sinks
#define BACKWARD_ARGS                                                          \
  const Tensor &grad_out, const Tensor &out, const Tensor &lse, FORWARD_ARGS, \
      c10::List<bool> needs_grad, at::OptionalIntArrayRef dmask_shape
using ForwardResult = std::tuple<Tensor, Tensor>;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

int64_t round_up8(int64_t x) { return (x + 7) / 8 * 8; }

// attn_mask (B, Hq, Tq, Tk), usually an expanded view, as float32 scores to add (bool: 0 where
// allowed, -inf elsewhere), converted on its un-broadcast part and expanded back (stride 0).
Tensor additive_mask(const Tensor& mask) {
  Tensor compact = mask;
  for (int64_t d = 0; d < mask.dim(); ++d)
    if (mask.stride(d) == 0 && mask.size(d) > 1) compact = compact.narrow(d, 0, 1);
  Tensor additive = mask.scalar_type() == at::kBool
                        ? at::where(compact, at::zeros({}, compact.options().dtype(at::kFloat)),
                                    at::full({}, -INFINITY, compact.options().dtype(at::kFloat)))
                        : compact.to(at::kFloat);
  return additive.expand(mask.sizes());
}

// The shape a float mask's gradient is accumulated at (peer_attention/problem.py's
// mask_grad_shape): the mask's, with 1 on every dim it is broadcast along (stride 0).
std::vector<int64_t> mask_grad_shape(const Tensor& mask) {
  std::vector<int64_t> shape(mask.sizes().begin(), mask.sizes().end());
  for (int64_t d = 0; d < mask.dim(); ++d)
    if (mask.stride(d) == 0) shape[d] = 1;
  return shape;
}

// A mask gradient at `shape` (ops.py's grad_at_shape): summed down to it, or, where it is more
// compact than `shape` (the op was handed a materialised mask whose gradient the autograd
// formula asked for at its dense shape), a stride-0 view of equal shares, made contiguous.
Tensor grad_at_shape(Tensor grad, at::IntArrayRef shape) {
  if (grad.sizes() == shape) return grad;
  bool reducible = true;
  std::vector<int64_t> common;
  for (int64_t d = 0; d < grad.dim(); ++d) {
    reducible = reducible && (shape[d] == grad.size(d) || shape[d] == 1);
    common.push_back(std::min(grad.size(d), shape[d]));
  }
  if (reducible) return grad.sum_to_size(shape);
  grad = grad.sum_to_size(common);
  int64_t copies = 1;
  for (int64_t n : shape) copies *= n;
  copies = grad.numel() > 0 ? copies / grad.numel() : 1;
  return (copies > 1 ? grad / static_cast<double>(copies) : grad).expand(shape).contiguous();
}

bool rows_aligned(const Tensor& t) {
  if (t.stride(-1) != 1) return false;
  for (int d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % 8 != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// t (.., C) with its channels zero-padded to `cols` and 16-byte aligned rows (a copy only when
// needed); dense=true also asks for a contiguous layout (the kernels index those directly).
Tensor prepared(const Tensor& t, int64_t cols, bool dense) {
  Tensor x = t;
  if (x.size(-1) != cols) x = at::constant_pad_nd(x, {0, cols - x.size(-1)});
  if (dense) x = x.contiguous();
  if (!rows_aligned(x) || (dense && !x.is_contiguous())) x = x.clone(at::MemoryFormat::Contiguous);
  return x;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kWho, what, " failed: ", cudaGetErrorString(err));
}

struct Prepared {
  AttentionParams params{};
  Tensor q, k, v, gate, bias, kv_lengths, mask;  // keep the prepared copies alive
  int64_t E = 0, Ev = 0, E8 = 0, Ev8 = 0;
  int head_dim_kernel = 0;
  bool per_peer = false;
};

// Of the SPEC section 9 variants the kernels serve bottom-right causal alignment; the Python
// backend declines the others (backends/cuda.py), this is the last line of defence.
void check_variants(int64_t window_left, int64_t window_right, double softcap,
                    const OptTensor& alibi_slopes, const OptTensor& sinks) {
  TORCH_CHECK(window_left < 0 && window_right < 0 && softcap == 0.0 &&
                  !alibi_slopes.has_value() && !sinks.has_value(),
              kWho, "windows, softcap, ALiBi and sinks are not supported");
}

void check_on_device_of_q(const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), kWho, name, ": expected device ", q.device(),
              " (as q), got ", t.device());
}

void check_shape(const char* name, const Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, kWho, name, ": expected shape ", expected, ", got ",
              t.sizes());
}

// Every argument against q (device, dtype, shape), before anything reads a size or a pointer:
// a direct torch.ops.peer_attention.cuda_fwd/cuda_bwd call gets a clear error naming the
// argument instead of a division by zero (no key/value heads) or a kernel reading host memory.
// Device-agnostic, so that the CPU registration below runs it too (tests/cuda, without a GPU).
void check_problem(const Tensor& q, const Tensor& k, const Tensor& v, at::IntArrayRef q_lens,
                   at::IntArrayRef kv_lens, at::IntArrayRef peers, const OptTensor& gate,
                   const OptTensor& bias, const OptTensor& kv_lengths,
                   const OptTensor& attn_mask, double dropout_p, c10::string_view normalize) {
  TORCH_CHECK(q.dim() == 4, kWho, "q must be 4-d (B, Hq, Tq, E), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, kWho, "k must be 4-d (B, H, Tk, E), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, kWho, "v must be 4-d (B, H, Tk, Ev), got ", v.sizes());
  check_on_device_of_q("k", k, q);
  check_on_device_of_q("v", v, q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kWho,
              "dtype must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kWho,
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), H = k.size(1), Tk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, kWho, "k and v must have q's batch size ", B,
              ", got ", k.size(0), " and ", v.size(0));
  TORCH_CHECK(H > 0, kWho, "k and v must have at least one head, got ", H);
  TORCH_CHECK(v.size(1) == H, kWho, "k and v head counts differ: ", H, " and ", v.size(1));
  TORCH_CHECK(Hq % H == 0, kWho, "q heads (", Hq, ") must be a multiple of k/v heads (", H, ")");
  TORCH_CHECK(v.size(2) == Tk, kWho, "k and v lengths differ: ", Tk, " and ", v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), kWho, "q and k head dims differ: ", q.size(3), " and ",
              k.size(3));
  // the kernels hold lengths, offsets and head counts in int (element offsets are 64-bit)
  constexpr int64_t kIntMax = (int64_t(1) << 31) - 1;
  TORCH_CHECK(B <= kIntMax && Hq <= kIntMax && Tq <= kIntMax && Tk <= kIntMax, kWho,
              "batch, heads and lengths must stay below 2^31");
  TORCH_CHECK(dropout_p == 0.0, kWho, "dropout is not supported");
  TORCH_CHECK(normalize == "joint" || normalize == "peer", kWho,
              "normalize must be 'joint' or 'peer', got '", std::string(normalize), "'");

  const int64_t S = static_cast<int64_t>(q_lens.size());
  TORCH_CHECK(S >= 1 && S <= kMaxStreams, kWho, "1..", kMaxStreams, " streams supported, got ", S);
  TORCH_CHECK(static_cast<int64_t>(kv_lens.size()) == S &&
                  static_cast<int64_t>(peers.size()) == S * S,
              kWho, "q_lens, kv_lens, peers do not describe ", S, " streams");
  int64_t q_total = 0, kv_total = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(q_lens[s] >= 0 && kv_lens[s] >= 0, kWho, "stream lengths must be >= 0");
    q_total += q_lens[s];
    kv_total += kv_lens[s];
  }
  TORCH_CHECK(q_total == Tq && kv_total == Tk, kWho, "stream lengths add up to ", q_total, " and ",
              kv_total, ", the packed lengths are ", Tq, " and ", Tk);

  const int64_t Ev = v.size(3);
  constexpr int64_t kMaxHeadDim = kHeadDims[sizeof(kHeadDims) / sizeof(kHeadDims[0]) - 1];
  TORCH_CHECK(std::max(q.size(3), Ev) <= kMaxHeadDim, kWho, "head dims up to ", kMaxHeadDim,
              " supported, got E=", q.size(3), ", Ev=", Ev);
  if (gate.has_value()) {
    check_on_device_of_q("gate", *gate, q);
    TORCH_CHECK(gate->is_floating_point(), kWho, "gate must be floating point, got ",
                gate->scalar_type());
    check_shape("gate", *gate, {B, S, S, Hq, Ev});
  }
  if (bias.has_value()) {
    check_on_device_of_q("bias", *bias, q);
    TORCH_CHECK(bias->is_floating_point(), kWho, "bias must be floating point, got ",
                bias->scalar_type());
    check_shape("bias", *bias, {B, S, S, Hq});
  }
  if (kv_lengths.has_value()) {  // the Python layer may keep it on the CPU: copied below
    TORCH_CHECK(kv_lengths->device() == q.device() || kv_lengths->is_cpu(), kWho,
                "kv_lengths: expected device ", q.device(), " (as q) or cpu, got ",
                kv_lengths->device());
    TORCH_CHECK(at::isIntegralType(kv_lengths->scalar_type(), /*includeBool=*/false), kWho,
                "kv_lengths must be an integer tensor, got ", kv_lengths->scalar_type());
    check_shape("kv_lengths", *kv_lengths, {B, S});
  }
  if (attn_mask.has_value()) {
    check_on_device_of_q("attn_mask", *attn_mask, q);
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool || attn_mask->is_floating_point(), kWho,
                "attn_mask must be bool or floating point, got ", attn_mask->scalar_type());
    check_shape("attn_mask", *attn_mask, {B, Hq, Tq, Tk});
  }
}

// The backward's own tensors: grad_out and out like the output, lse as the forward wrote it.
void check_backward_inputs(const Tensor& grad_out, const Tensor& out, const Tensor& lse,
                           const Tensor& q, const Tensor& v, int64_t S, bool per_peer) {
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"grad_out", grad_out},
                                std::pair<const char*, const Tensor&>{"out", out}}) {
    check_on_device_of_q(name, t, q);
    TORCH_CHECK(t.is_floating_point(), kWho, name, " must be floating point, got ",
                t.scalar_type());
    check_shape(name, t, {B, Hq, Tq, v.size(3)});
  }
  check_on_device_of_q("lse", lse, q);
  TORCH_CHECK(lse.is_floating_point(), kWho, "lse must be floating point, got ", lse.scalar_type());
  if (per_peer)
    check_shape("lse", lse, {B, Hq, S, Tq});
  else
    check_shape("lse", lse, {B, Hq, Tq});
}

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, at::IntArrayRef q_lens,
                 at::IntArrayRef kv_lens, at::IntArrayRef peers, const OptTensor& gate,
                 const OptTensor& bias, const OptTensor& kv_lengths, const OptTensor& attn_mask,
                 double dropout_p, bool is_causal, bool bottom_right, double scale,
                 c10::string_view normalize) {
  check_problem(q, k, v, q_lens, kv_lens, peers, gate, bias, kv_lengths, attn_mask, dropout_p,
                normalize);
  TORCH_CHECK(q.is_cuda(), kWho, "q, k, v must be CUDA tensors, got ", q.device());
  const int64_t S = static_cast<int64_t>(q_lens.size());

  Prepared out;
  out.E = q.size(3);
  out.Ev = v.size(3);
  out.E8 = round_up8(out.E);
  out.Ev8 = round_up8(out.Ev);
  out.head_dim_kernel = kernel_head_dim(static_cast<int>(std::max(out.E8, out.Ev8)));
  out.per_peer = normalize == "peer";

  out.q = prepared(q, out.E8, false);
  out.k = prepared(k, out.E8, false);
  out.v = prepared(v, out.Ev8, false);
  if (gate.has_value()) {
    out.gate = gate->to(at::kFloat).contiguous();
    if (out.Ev8 != out.Ev) out.gate = at::constant_pad_nd(out.gate, {0, out.Ev8 - out.Ev});
    out.gate = out.gate.contiguous();
  }
  if (bias.has_value()) out.bias = bias->to(at::kFloat).contiguous();
  if (kv_lengths.has_value())
    out.kv_lengths = kv_lengths->to(q.device(), at::kInt).contiguous();
  if (attn_mask.has_value()) out.mask = additive_mask(*attn_mask);

  AttentionParams& p = out.params;
  p.q = out.q.data_ptr();
  p.k = out.k.data_ptr();
  p.v = out.v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_strides[d] = out.q.stride(d);
    p.k_strides[d] = out.k.stride(d);
    p.v_strides[d] = out.v.stride(d);
  }
  p.batch = static_cast<int>(q.size(0));
  p.q_heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(out.E8);
  p.value_dim = static_cast<int>(out.Ev8);
  p.total_q = static_cast<int>(q.size(2));
  p.total_kv = static_cast<int>(k.size(2));
  p.num_streams = static_cast<int>(S);
  p.q_offsets[0] = p.kv_offsets[0] = 0;
  for (int64_t s = 0; s < S; ++s) {
    p.q_offsets[s + 1] = p.q_offsets[s] + static_cast<int>(q_lens[s]);
    p.kv_offsets[s + 1] = p.kv_offsets[s] + static_cast<int>(kv_lens[s]);
    uint32_t row = 0;
    for (int64_t t = 0; t < S; ++t)
      if (peers[s * S + t]) row |= 1u << t;
    p.peer_rows[s] = row;
  }
  p.gate = out.gate.defined() ? out.gate.data_ptr<float>() : nullptr;
  p.bias = out.bias.defined() ? out.bias.data_ptr<float>() : nullptr;
  p.kv_lengths = out.kv_lengths.defined() ? out.kv_lengths.data_ptr<int>() : nullptr;
  p.mask = out.mask.defined() ? out.mask.data_ptr<float>() : nullptr;
  for (int d = 0; d < 4; ++d) p.mask_strides[d] = out.mask.defined() ? out.mask.stride(d) : 0;
  p.causal = is_causal;
  p.bottom_right = bottom_right;
  p.per_peer = out.per_peer;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return out;
}

template <typename T>
cudaError_t forward_for(int d, const AttentionParams& p, cudaStream_t stream) {
  switch (d) {
    case 32: return run_forward<32, T>(p, stream);
    case 64: return run_forward<64, T>(p, stream);
    case 96: return run_forward<96, T>(p, stream);
    case 128: return run_forward<128, T>(p, stream);
    case 160: return run_forward<160, T>(p, stream);
    case 192: return run_forward<192, T>(p, stream);
    case 256: return run_forward<256, T>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t forward_dispatch(at::ScalarType dtype, int d, const AttentionParams& p,
                             cudaStream_t stream) {
  return dtype == at::kHalf ? forward_for<__half>(d, p, stream)
                            : forward_for<__nv_bfloat16>(d, p, stream);
}

template <typename T>
cudaError_t backward_for(int d, bool dq, const AttentionParams& p, cudaStream_t stream) {
  switch (d) {
    case 32: return dq ? run_backward_dq<32, T>(p, stream) : run_backward_dkdv<32, T>(p, stream);
    case 64: return dq ? run_backward_dq<64, T>(p, stream) : run_backward_dkdv<64, T>(p, stream);
    case 96: return dq ? run_backward_dq<96, T>(p, stream) : run_backward_dkdv<96, T>(p, stream);
    case 128:
      return dq ? run_backward_dq<128, T>(p, stream) : run_backward_dkdv<128, T>(p, stream);
    case 160:
      return dq ? run_backward_dq<160, T>(p, stream) : run_backward_dkdv<160, T>(p, stream);
    case 192:
      return dq ? run_backward_dq<192, T>(p, stream) : run_backward_dkdv<192, T>(p, stream);
    case 256:
      return dq ? run_backward_dq<256, T>(p, stream) : run_backward_dkdv<256, T>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward_dispatch(at::ScalarType dtype, int d, bool dq, const AttentionParams& p,
                              cudaStream_t stream) {
  return dtype == at::kHalf ? backward_for<__half>(d, dq, p, stream)
                            : backward_for<__nv_bfloat16>(d, dq, p, stream);
}

// the fused backward (launch.h: plain path, D <= kFusedBackwardMaxDim)
template <typename T>
cudaError_t backward_fused_for(int d, const AttentionParams& p, cudaStream_t stream) {
  switch (d) {
    case 32: return run_backward_fused<32, T>(p, stream);
    case 64: return run_backward_fused<64, T>(p, stream);
    case 96: return run_backward_fused<96, T>(p, stream);
    case 128: return run_backward_fused<128, T>(p, stream);
  }
  return cudaErrorInvalidValue;
}

ForwardResult forward(FORWARD_ARGS) {
  (void)dropout_seed;
  check_variants(window_left, window_right, softcap, alibi_slopes, sinks);
  Prepared prep = prepare(q, k, v, q_lens, kv_lens, peers, gate, bias, kv_lengths, attn_mask,
                          dropout_p, is_causal, bottom_right, scale, normalize);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), S = q_lens.size();
  const auto f32 = q.options().dtype(at::kFloat);
  AttentionParams& p = prep.params;
  Tensor out, out_accum, lse;
  if (prep.per_peer) {
    out_accum = at::zeros({B, Hq, Tq, prep.Ev8}, f32);
    lse = at::full({B, Hq, S, Tq}, -INFINITY, f32);
    p.out_accum = out_accum.data_ptr<float>();
  } else {
    out = at::empty({B, Hq, Tq, prep.Ev8}, q.options());
    lse = at::empty({B, Hq, Tq}, f32);
    p.out = out.data_ptr();
  }
  p.lse = lse.data_ptr<float>();
  check_cuda(forward_dispatch(q.scalar_type(), prep.head_dim_kernel, p,
                              at::cuda::getCurrentCUDAStream()),
             "forward kernel");
  if (prep.per_peer) out = out_accum.to(q.scalar_type());
  if (prep.Ev8 != prep.Ev) out = out.narrow(3, 0, prep.Ev).contiguous();
  return {out, lse};
}

BackwardResult backward(BACKWARD_ARGS) {
  (void)dropout_seed;
  check_variants(window_left, window_right, softcap, alibi_slopes, sinks);
  TORCH_CHECK(needs_grad.size() == 7, kWho, "needs_grad must have 7 entries");
  const bool need_dq = needs_grad[0], need_dk = needs_grad[1], need_dv = needs_grad[2];
  const bool need_dgate = needs_grad[3] && gate.has_value();
  const bool need_dbias = needs_grad[4] && bias.has_value();
  const bool need_dmask =
      needs_grad[5] && attn_mask.has_value() && attn_mask->is_floating_point();
  Prepared prep = prepare(q, k, v, q_lens, kv_lens, peers, gate, bias, kv_lengths, attn_mask,
                          dropout_p, is_causal, bottom_right, scale, normalize);
  check_backward_inputs(grad_out, out, lse, q, v, q_lens.size(), prep.per_peer);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = q.size(0), Hq = q.size(1), H = k.size(1), Tq = q.size(2), Tk = k.size(2);
  const int64_t S = q_lens.size();
  const auto f32 = q.options().dtype(at::kFloat);
  const at::ScalarType dtype = q.scalar_type();
  const int d = prep.head_dim_kernel;
  AttentionParams& p = prep.params;

  Tensor dout = prepared(grad_out.to(dtype), prep.Ev8, true);
  Tensor lse_c = lse.to(at::kFloat).contiguous();
  p.dout = dout.data_ptr();
  p.lse = lse_c.data_ptr<float>();

  Tensor delta;
  if (prep.per_peer) {
    delta = at::zeros({B, Hq, S, Tq}, f32);
  } else {
    Tensor out_c = prepared(out.to(dtype), prep.Ev8, true);
    delta = at::empty({B, Hq, Tq}, f32);
    check_cuda(dtype == at::kHalf
                   ? run_delta_rowdot<__half>(dout.data_ptr(), out_c.data_ptr(),
                                              delta.data_ptr<float>(), B * Hq * Tq, p.value_dim,
                                              stream)
                   : run_delta_rowdot<__nv_bfloat16>(dout.data_ptr(), out_c.data_ptr(),
                                                     delta.data_ptr<float>(), B * Hq * Tq,
                                                     p.value_dim, stream),
               "delta preprocess");
  }
  p.delta = delta.data_ptr<float>();

  Tensor dgate_accum;
  if (need_dgate) {
    dgate_accum = at::zeros({B, S, S, Hq, prep.Ev8}, f32);
    p.dgate = dgate_accum.data_ptr<float>();
  }
  if (prep.per_peer || need_dgate) {  // U_p: per-peer delta and the gate gradient
    p.recompute = true;
    check_cuda(forward_dispatch(dtype, d, p, stream), "backward recompute");
    p.recompute = false;
    p.dgate = nullptr;
  }

  Tensor dq_padded, dq_accum, dbias_accum, dmask, dk_accum, dv_accum;
  // FlashAttention-2's fused loop (dQ by float32 atomics: not under deterministic algorithms,
  // where the order of the additions must not vary) when dQ and dK or dV are asked for
  const bool fused = need_dq && (need_dk || need_dv) && !need_dbias && !need_dmask &&
                     fused_backward_serves(p, d) &&
                     !at::globalContext().deterministicAlgorithms();
  if (fused) {
    dq_accum = at::zeros({B, Hq, Tq, d}, f32);  // the kernel's head dim: no column test
    dk_accum = at::zeros({B, H, Tk, prep.E8}, f32);
    dv_accum = at::zeros({B, H, Tk, prep.Ev8}, f32);
    p.dq_accum = dq_accum.data_ptr<float>();
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
    check_cuda(dtype == at::kHalf ? backward_fused_for<__half>(d, p, stream)
                                  : backward_fused_for<__nv_bfloat16>(d, p, stream),
               "fused backward kernel");
  }
  if (need_dmask) {
    // a broadcast mask's gradient is added at its own shape (stride 0 where broadcast), not in
    // a dense (B, Hq, Tq, Tk) buffer; dense (one store per score, summed afterwards) when it
    // broadcasts nowhere or the additions' order must not vary (deterministic algorithms)
    const std::vector<int64_t> compact = mask_grad_shape(*attn_mask);
    const std::vector<int64_t> full = {B, Hq, Tq, Tk};
    dmask = at::zeros(at::globalContext().deterministicAlgorithms() ? full : compact, f32);
    const Tensor indexed = dmask.expand({B, Hq, Tq, Tk});
    for (int d = 0; d < 4; ++d) p.dmask_strides[d] = indexed.stride(d);
    p.dmask = dmask.data_ptr<float>();
  }
  if (!fused && (need_dq || need_dbias || need_dmask)) {
    dq_padded = at::empty({B, Hq, Tq, prep.E8}, q.options());
    p.dq = dq_padded.data_ptr();
    if (need_dbias) {
      dbias_accum = at::zeros({B, S, S, Hq}, f32);
      p.dbias = dbias_accum.data_ptr<float>();
    }
    check_cuda(backward_dispatch(dtype, d, true, p, stream), "dq kernel");
  }
  if (!fused && (need_dk || need_dv)) {
    dk_accum = at::zeros({B, H, Tk, prep.E8}, f32);
    dv_accum = at::zeros({B, H, Tk, prep.Ev8}, f32);
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
    check_cuda(backward_dispatch(dtype, d, false, p, stream), "dk/dv kernel");
  }

  // a fresh empty tensor per gradient nobody asked for: outputs of a custom op must not alias
  auto none = [&] { return at::empty({0}, q.options()); };
  Tensor dq = !need_dq ? none()
              : fused   ? dq_accum.narrow(3, 0, prep.E).mul(scale).to(dtype).contiguous()
                        : dq_padded.narrow(3, 0, prep.E).contiguous();
  Tensor dk = need_dk ? dk_accum.narrow(3, 0, prep.E).to(k.scalar_type()).contiguous() : none();
  Tensor dv = need_dv ? dv_accum.narrow(3, 0, prep.Ev).to(v.scalar_type()).contiguous() : none();
  // gate, bias and a float mask may be float32 with 16-bit q (the API upcasts broadcast ones so
  // that autograd sums their gradient in float32): their gradients keep their own dtype
  Tensor dgate =
      need_dgate ? dgate_accum.narrow(4, 0, prep.Ev).to(gate->scalar_type()).contiguous() : none();
  Tensor dbias = need_dbias ? dbias_accum.to(bias->scalar_type()) : none();
  Tensor dmask_out =
      need_dmask ? grad_at_shape(dmask, dmask_shape.has_value()
                                            ? *dmask_shape
                                            : at::IntArrayRef(mask_grad_shape(*attn_mask)))
                       .to(attn_mask->scalar_type())
                       .contiguous()
                 : none();
  return {dq, dk, dv, dgate, dbias, dmask_out, none()};
}

// The same ops for CPU tensors: the CUDA kernels' argument checks, then a refusal. A direct call
// with host tensors gets the error about its arguments (or that it needs CUDA tensors) instead
// of torch's "no kernel for CPU", and tests/cuda/test_binding_checks.py exercises every check
// of check_problem / check_backward_inputs without a GPU.
ForwardResult forward_checks_only(FORWARD_ARGS) {
  check_variants(window_left, window_right, softcap, alibi_slopes, sinks);
  check_problem(q, k, v, q_lens, kv_lens, peers, gate, bias, kv_lengths, attn_mask, dropout_p,
                normalize);
  TORCH_CHECK_NOT_IMPLEMENTED(false, kWho, "q, k, v must be CUDA tensors, got ", q.device());
}

BackwardResult backward_checks_only(BACKWARD_ARGS) {
  check_variants(window_left, window_right, softcap, alibi_slopes, sinks);
  TORCH_CHECK(needs_grad.size() == 7, kWho, "needs_grad must have 7 entries");
  check_problem(q, k, v, q_lens, kv_lens, peers, gate, bias, kv_lengths, attn_mask, dropout_p,
                normalize);
  check_backward_inputs(grad_out, out, lse, q, v, q_lens.size(), normalize == "peer");
  TORCH_CHECK_NOT_IMPLEMENTED(false, kWho, "q, k, v must be CUDA tensors, got ", q.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(peer_attention, CUDA, m) {
  m.impl("cuda_fwd", &forward);
  m.impl("cuda_bwd", &backward);
}

TORCH_LIBRARY_IMPL(peer_attention, CPU, m) {
  m.impl("cuda_fwd", &forward_checks_only);
  m.impl("cuda_bwd", &backward_checks_only);
}

}  // namespace peer_attention

// The Python module peer_attention._C: importing it loads the library, which registers the
// kernels above. Its one function:
// kernel_image_error(device_index) -> str: "" when this build holds machine code or PTX for the
// device, else the CUDA error (backends/cuda.py then declines the device with it instead of
// failing at the first launch).
static PyObject* kernel_image_error(PyObject*, PyObject* arg) {
  const long index = PyLong_AsLong(arg);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  cudaError_t err;
  {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
    err = peer_attention::probe_kernel_image();
  }
  (void)cudaGetLastError();  // not sticky; clear it so that torch's next check does not see it
  return PyUnicode_FromString(err == cudaSuccess ? "" : cudaGetErrorString(err));
}

static PyMethodDef peer_attention_methods[] = {
    {"kernel_image_error", kernel_image_error, METH_O,
     "'' when the kernels can run on the device of this index, else why not"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef peer_attention_module = {PyModuleDef_HEAD_INIT, "_C",
                                                   "CUDA kernels of peer_attention", -1,
                                                   peer_attention_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&peer_attention_module); }
