"""Differentiable gradients for double backward (create_graph=True), for every backend.

A backend's backward op is a kernel: its outputs carry no autograd history, so a gradient of a
gradient (a WGAN-GP / R1 penalty, gradgradcheck, Hessian-vector products) would silently be zero.
When the backward runs with grad mode on, ops.py calls `differentiable_grads` instead: the forward
is recomputed from the saved tensors with the reference formulas (plain PyTorch ops, 16-bit inputs
in float32) and differentiated under autograd with create_graph=True, so every order is exact.

Dropout: the recomputation needs the very keep mask the forward kernel drew. A backend whose mask
can be regenerated in PyTorch registers it in DROPOUT_KEEP_MASKS; any other backend raises
instead of giving a wrong (or zero) second-order gradient.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor

from .problem import AttentionProblem, remembered_keep_mask
from .reference import dropout_keep_mask, peer_attention_reference


def _reference_keep_mask(problem: AttentionProblem) -> Tensor:
    keep = remembered_keep_mask(problem)  # the forward's, when it left one
    if keep is not None:
        return keep
    q, k = problem.q, problem.k
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return dropout_keep_mask(shape, problem.dropout_p, int(problem.dropout_seed[0]), q.device)


def _triton_keep_mask(problem: AttentionProblem) -> Tensor:
    from .triton_kernels import dropout_keep_mask as triton_mask

    return triton_mask(problem)


def _torch_keep_mask(problem: AttentionProblem) -> Tensor:
    from .backends.torch_dropout import keep_mask

    return keep_mask(problem)


# backend name -> keep mask (B, Hq, Tq, Tk) bool of its forward for this problem
DROPOUT_KEEP_MASKS: Dict[str, Callable[[AttentionProblem], Tensor]] = {
    "reference": _reference_keep_mask,
    "triton": _triton_keep_mask,
    "torch": _torch_keep_mask,
}

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute(t, dtype):
    if t is None or t.dtype == torch.bool or not t.is_floating_point():
        return t
    return t.to(dtype)


def recompute_output(problem: AttentionProblem, keep_mask) -> Tensor:
    """The forward output (B, Hq, Tq, Ev) from plain differentiable PyTorch ops."""
    p = problem
    compute = torch.float32 if p.q.dtype in _LOW_PRECISION else p.q.dtype
    q, k, v = _compute(p.q, compute), _compute(p.k, compute), _compute(p.v, compute)
    outs = peer_attention_reference(
        q.split(list(p.q_lens), dim=2), k.split(list(p.kv_lens), dim=2),
        v.split(list(p.kv_lens), dim=2),
        peers=p.peers_nested(), gate=_compute(p.gate, compute), bias=_compute(p.bias, compute),
        normalize=p.normalize, is_causal=p.is_causal, kv_lengths=p.kv_lengths, scale=p.scale,
        attn_mask=_compute(p.attn_mask, compute), dropout_mask=keep_mask,
        dropout_p=p.dropout_p, window=(p.window_left, p.window_right),
        bottom_right=p.bottom_right, softcap=p.softcap, alibi_slopes=p.alibi_slopes,
        sinks=_compute(p.sinks, compute),
    )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(p.q.dtype)


def differentiable_grads(backend: str, problem: AttentionProblem, grad_out: Tensor,
                         inputs: Sequence, needs: Sequence[bool]) -> List:
    """Gradients of the inputs (q, k, v, gate, bias, attn_mask, sinks) that need one, as tensors
    with autograd history (None elsewhere)."""
    keep = None
    if problem.dropout_p > 0:
        regenerate = DROPOUT_KEEP_MASKS.get(backend)
        if regenerate is None:
            raise RuntimeError(
                f"peer_attention: double backward (create_graph=True) through dropout is not "
                f"supported on backend {backend!r}: its dropout mask cannot be regenerated in "
                f"PyTorch. Use dropout_p=0, or backend='reference', 'triton' or 'torch'.")
        keep = regenerate(problem)
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    if not wanted:
        return [None] * len(inputs)
    with torch.autocast(problem.q.device.type, enabled=False):  # the dtypes of the forward
        out = recompute_output(problem, keep)
    if out.requires_grad:
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                         allow_unused=True))
    else:
        grads = iter([None] * len(wanted))
    result = []
    for t, need in zip(inputs, needs):
        if not need or t is None:
            result.append(None)
            continue
        grad = next(grads)
        result.append(torch.zeros_like(t) if grad is None else grad)
    return result
