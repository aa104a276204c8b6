"""One stream pair through torch's own fused SDPA kernels (the ones that return the log-sum-exp).

    pair_forward(q, k, v, mask, is_causal, scale) -> (out (B, Hq, L, Ev), lse (B, Hq, L))
    pair_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale) -> (dq, dk, dv)

`mask` is None or an additive float mask broadcastable to (B, Hq, L, M) (0 / -inf for the masks
the backend builds). The backward recomputes P = exp(scores - lse) from the lse it is given and
D = <grad_out, out> from the two tensors it is given: the caller chooses all three (see
torch_backend.py: that is how one pair's backward serves the joint merge). L and M must be > 0:
the CPU kernel divides by zero on empty key sets.

CPU: aten::_scaled_dot_product_flash_attention_for_cpu (GQA native, E == Ev only: a different
value width is zero-padded, which changes no score). CUDA (and ROCm, same device type):
aten::_scaled_dot_product_efficient_attention, which wants equal head counts (repeated for GQA),
head dims that are multiples of 8 and a bias with aligned rows (both zero/-inf padded here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import repeat_kv_heads

_aten = torch.ops.aten
# the torch-namespace binding of the op: ~2 us less per call than the OpOverload (no backward one)
_CPU_FWD = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu",
                   _aten._scaled_dot_product_flash_attention_for_cpu.default)
_CPU_BWD = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_CUDA_FWD = _aten._scaled_dot_product_efficient_attention.default
_CUDA_BWD = _aten._scaled_dot_product_efficient_attention_backward.default

# the efficient kernel reads the bias with 16-element-aligned rows and pads its lse rows to 32
_CUDA_BIAS_ALIGN = 16
_CUDA_LSE_ALIGN = 32
_CUDA_HEAD_ALIGN = 8  # head dims zero-padded to a multiple of 8, as torch's SDPA front end does


def _pad_last(t: Tensor, width: int) -> Tensor:
    extra = width - t.shape[-1]
    return t if extra == 0 else F.pad(t, (0, extra))


# ---- CPU ----------------------------------------------------------------------------------------

_CPU_PARALLEL_GRAIN = 32768  # ATen's at::internal::GRAIN_SIZE: smaller copies run on one thread


def contiguous_lse(lse: Tensor) -> Tensor:
    """The CPU kernel's lse (B, H, L) in its (B, L, H) layout, made contiguous in row blocks below
    ATen's parallel grain: a parallel copy right after the kernel waits for the OpenMP workers to
    be scheduled again, which measured ~5 ms on a loaded 2-core machine, for a 37k-float copy."""
    if lse.numel() <= _CPU_PARALLEL_GRAIN or lse.device.type != "cpu" or lse.is_contiguous():
        return lse.contiguous()  # a single-threaded copy anyway (or none)
    out = torch.empty(lse.shape, dtype=lse.dtype)
    rows = max(1, _CPU_PARALLEL_GRAIN // max(1, lse[0].numel()))
    for start in range(0, lse.shape[0], rows):
        out[start:start + rows].copy_(lse[start:start + rows])
    return out

NEG_INF = float("-inf")


def mark_empty_rows(out: Tensor, lse: Tensor, mask: Tensor):
    """(out, lse) with lse -inf (and out 0) on the rows whose mask hides every key: the CPU kernel
    reports lse 0 there (a top-left causal row sees key 0, so only the mask can empty a row)."""
    if lse.device.type == "cpu":
        candidates = lse == 0
        if not bool(candidates.any()):
            return out, lse
        empty = candidates & (mask == NEG_INF).all(-1)
        return out, lse.masked_fill(empty, NEG_INF)
    empty = (mask == NEG_INF).all(-1).expand(lse.shape)
    return out.masked_fill(empty[..., None], 0), lse.masked_fill(empty, NEG_INF)


def _cpu_forward(q, k, v, mask, is_causal, scale):
    value_dim = v.shape[-1]
    width = max(q.shape[-1], value_dim)
    if q.shape[-1] != value_dim:
        q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)
    out, lse = _CPU_FWD(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    if out.shape[-1] != value_dim:
        out = out[..., :value_dim]
    return out, lse


def _cpu_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale):
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    width = max(head_dim, value_dim)
    if head_dim != value_dim:  # zero columns: no score changes, and <grad_out, out> neither
        q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)
        grad_out, out = _pad_last(grad_out, width), _pad_last(out, width)
    # any grad_out layout (an expanded one too): the kernel reads its strides, as for torch's own
    # autograd formula, which passes the gradient as it comes
    dq, dk, dv = _CPU_BWD(grad_out, q, k, v, out, lse, 0.0, is_causal,
                          attn_mask=mask, scale=scale)
    if head_dim != value_dim:
        dq, dk, dv = dq[..., :head_dim], dk[..., :head_dim], dv[..., :value_dim]
    return dq, dk, dv


# ---- CUDA (efficient attention; not run in this project's CI, which has no GPU) ------------------

def _cuda_bias(mask, q, kv_len):
    if mask is None:
        return None
    batch, heads, q_len = q.shape[:3]
    padded = -(-kv_len // _CUDA_BIAS_ALIGN) * _CUDA_BIAS_ALIGN
    full = mask.to(q.dtype).expand(batch, heads, q_len, kv_len)
    return _pad_last(full, padded)[..., :kv_len]


def _aligned(n: int) -> int:
    return -(-n // _CUDA_HEAD_ALIGN) * _CUDA_HEAD_ALIGN


def _cuda_forward(q, k, v, mask, is_causal, scale):
    heads, value_dim = q.shape[1], v.shape[-1]
    head_width, value_width = _aligned(q.shape[-1]), _aligned(value_dim)
    q, k = _pad_last(q, head_width), _pad_last(repeat_kv_heads(k, heads), head_width)
    v = _pad_last(repeat_kv_heads(v, heads), value_width)
    out, lse, _seed, _offset = _CUDA_FWD(q, k, v, _cuda_bias(mask, q, k.shape[2]), True, 0.0,
                                         is_causal, scale=scale)
    return out[..., :value_dim], lse[..., :q.shape[2]]


def _cuda_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale):
    kv_heads, heads, q_len = k.shape[1], q.shape[1], q.shape[2]
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    head_width, value_width = _aligned(head_dim), _aligned(value_dim)
    q = _pad_last(q, head_width)
    k_full = _pad_last(repeat_kv_heads(k, heads), head_width)
    v_full = _pad_last(repeat_kv_heads(v, heads), value_width)
    grad_out, out = _pad_last(grad_out, value_width), _pad_last(out, value_width)
    padded_len = -(-q_len // _CUDA_LSE_ALIGN) * _CUDA_LSE_ALIGN
    lse_full = lse.new_full((*lse.shape[:-1], padded_len), float("inf"))
    lse_full[..., :q_len] = lse
    bias = _cuda_bias(mask, q, k.shape[2])
    no_rng = torch.zeros((), dtype=torch.int64)  # philox seed/offset: read only with dropout
    dq, dk, dv, _ = _CUDA_BWD(grad_out.contiguous(), q, k_full, v_full, bias, out.contiguous(),
                              lse_full, no_rng, no_rng, 0.0, [True, True, True, False], is_causal,
                              scale=scale)  # bias None = no bias (an undefined tensor)
    dq, dk, dv = dq[..., :head_dim], dk[..., :head_dim], dv[..., :value_dim]
    groups = heads // kv_heads
    if groups > 1:  # a shared key/value head collects the gradients of its query heads
        dk = dk.unflatten(1, (kv_heads, groups)).sum(2)
        dv = dv.unflatten(1, (kv_heads, groups)).sum(2)
    return dq, dk, dv


_KERNELS = {"cpu": (_cpu_forward, _cpu_backward), "cuda": (_cuda_forward, _cuda_backward)}
DEVICES = frozenset(_KERNELS)


def pair_forward(q: Tensor, k: Tensor, v: Tensor, mask, is_causal: bool, scale: float):
    return _KERNELS[q.device.type][0](q, k, v, mask, is_causal, scale)


def pair_backward(grad_out, q, k, v, out, lse, mask, is_causal: bool, scale: float):
    return _KERNELS[q.device.type][1](grad_out, q, k, v, out, lse, mask, is_causal, scale)
