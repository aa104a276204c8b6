"""Differentiable gradients for double backward (create_graph=True), for every backend.

A backend's backward op is a kernel: its outputs carry no autograd history, so a gradient of a
gradient (a WGAN-GP / R1 penalty, gradgradcheck, Hessian-vector products) would silently be zero.
When the backward runs with grad mode on, ops.py calls `differentiable_grads` instead: the forward
is recomputed from the saved tensors with the reference formulas (plain PyTorch ops, 16-bit inputs
in float32) and differentiated under autograd with create_graph=True, so every order is exact.

Dropout: the recomputation needs the very keep mask the forward kernel drew: the backend's
`dropout_keep_mask` (backends/base.py) regenerates it in PyTorch; a backend that cannot raises
instead of giving a wrong (or zero) second-order gradient.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .backends.base import BACKENDS, Backend
from .problem import AttentionProblem
from .reference import compute_dtype, problem_reference


def _compute(t, dtype):
    if t is None or t.dtype == torch.bool or not t.is_floating_point():
        return t
    return t.to(dtype)


def recompute_output(problem: AttentionProblem, keep_mask) -> Tensor:
    """The forward output (B, Hq, Tq, Ev) from plain differentiable PyTorch ops."""
    p = problem
    compute = compute_dtype(p.q.dtype)
    outs = problem_reference(
        p, _compute(p.q, compute), _compute(p.k, compute), _compute(p.v, compute),
        _compute(p.gate, compute), _compute(p.bias, compute), _compute(p.attn_mask, compute),
        _compute(p.sinks, compute), dropout_mask=keep_mask)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(p.q.dtype)


def _keep_mask(backend: str, problem: AttentionProblem) -> Tensor:
    owner = BACKENDS.get(backend)
    keep = None if owner is None else owner.dropout_keep_mask(problem)
    if keep is None:
        able = [name for name, b in BACKENDS.items()
                if type(b).dropout_keep_mask is not Backend.dropout_keep_mask]
        raise RuntimeError(
            f"peer_attention: double backward (create_graph=True) through dropout is not "
            f"supported on backend {backend!r}: its dropout mask cannot be regenerated in "
            f"PyTorch. Use dropout_p=0, or backend={' or '.join(repr(n) for n in able)}.")
    return keep


def differentiable_grads(backend: str, problem: AttentionProblem, grad_out: Tensor,
                         inputs: Sequence, needs: Sequence[bool]) -> List:
    """Gradients of the inputs (q, k, v, gate, bias, attn_mask, sinks) that need one, as tensors
    with autograd history (None elsewhere)."""
    keep = _keep_mask(backend, problem) if problem.dropout_p > 0 else None
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
