"""Dropout on the `torch` backend (CPU, SDPA only): torch's own numbers, bit for bit.

torch's CPU SDPA serves dropout with its math path: softmax weights computed in float32 (float64
for float64), then `at::dropout`, which multiplies them by `empty_like(weights).bernoulli_(1 - p)
/ (1 - p)` drawn from the default CPU generator, then the product with the values, rounded once
to the input dtype. This file does the same operations in the same order, so with the generator
in the same state the output and the gradients are identical.

`dropout_seed` carries the generator: dispatch replaces the [seed, offset] pair the API drew by
the default generator's state from before that draw (a uint8 tensor, see `replay_torch_rng`) and
rewinds the generator, as if the draw never happened; the forward then advances the default
generator exactly as torch's call would, and the backward regenerates the same mask from the
saved state (or reuses the keep mask the forward left on the seed tensor: no random operation in a
backward, which vmap would refuse). An int64 [seed, offset] (a problem built by hand) seeds a
private generator.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..problem import empty_grad
from ..problem import AttentionProblem, lse_dtype, remember_keep_mask, remembered_keep_mask
from ..reference import repeat_kv_heads

_MATH = torch.ops.aten._scaled_dot_product_attention_math.default
STATE_ATTR = "_peer_attention_cpu_rng_state"  # set on the seed tensor by dispatch.draw_dropout_seed


def replay_torch_rng(problem: AttentionProblem) -> AttentionProblem:
    """The problem with its dropout seed replaced by the CPU generator state from before the seed
    was drawn, and that state restored (so the backend's draw is torch's draw)."""
    state = getattr(problem.dropout_seed, STATE_ATTR, None)
    if state is None or problem.q.device.type != "cpu":
        return problem
    torch.default_generator.set_state(state)
    return problem._replace(dropout_seed=state)


def _generator(seed: Tensor) -> torch.Generator:
    gen = torch.Generator()
    if seed.dtype == torch.uint8:
        gen.set_state(seed)
    else:
        gen.manual_seed(int(seed[0]) ^ int(seed[1]))
    return gen


def _noise(weights: Tensor, dropout_p: float, gen) -> Tensor:
    if dropout_p >= 1.0:  # torch multiplies by zero and draws nothing
        return torch.zeros_like(weights)
    return torch.empty_like(weights).bernoulli_(1.0 - dropout_p, generator=gen).div_(1.0 - dropout_p)


def _weights(problem: AttentionProblem, q, k, v, mask):
    """(softmax weights (B, Hq, L, S), values (B, Hq, S, Ev)) in the compute dtype, as torch's
    math path computes them before its dropout."""
    p = problem
    compute = lse_dtype(q.dtype)
    if mask is not None and mask.dtype == torch.bool:  # as torch's SDPA converts it
        mask = torch.zeros(mask.shape, dtype=compute).masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        mask = mask.to(compute)
    heads = q.shape[1]
    _, weights = _MATH(q.to(compute), k.to(compute), v.to(compute), mask, 0.0, p.is_causal,
                       scale=p.scale, enable_gqa=heads != k.shape[1])
    return weights, repeat_kv_heads(v.to(compute), heads)


def _saved_noise(problem: AttentionProblem, weights: Tensor) -> Tensor:
    """The forward's noise again: from the keep mask it left (no random draw, so a backward under
    vmap works), else drawn again from the saved generator state (the same numbers)."""
    keep = remembered_keep_mask(problem)
    if keep is None:
        return _noise(weights, problem.dropout_p, _generator(problem.dropout_seed))
    if problem.dropout_p >= 1.0:
        return torch.zeros_like(weights)
    return keep.to(weights.dtype).div_(1.0 - problem.dropout_p)  # bernoulli_'s 0/1, then div_


def dropout_forward(problem: AttentionProblem, plain_forward):
    """(out, lse): out with torch's dropout mask, lse of the undropped scores (from
    `plain_forward`, the backend's forward without dropout)."""
    p = problem
    gen = _generator(p.dropout_seed)
    weights, values = _weights(p, p.q, p.k, p.v, p.attn_mask)
    noise = _noise(weights, p.dropout_p, gen)
    remember_keep_mask(p, noise != 0)
    out = torch.matmul(weights * noise, values).to(p.q.dtype)
    if p.dropout_seed.dtype == torch.uint8:  # advance the default generator as torch's call does
        torch.default_generator.set_state(gen.get_state())
    _, lse = plain_forward(p._replace(dropout_p=0.0, dropout_seed=None))
    return out, lse


def dropout_backward(problem: AttentionProblem, grad_out, needs_grad):
    """Gradients through the same operations, with the forward's mask."""
    p = problem
    originals = (p.q, p.k, p.v, p.attn_mask)
    wants = list(needs_grad[:3]) + [bool(needs_grad[5]) and p.attn_mask is not None
                                    and p.attn_mask.dtype != torch.bool]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(w) if t is not None else None
                  for t, w in zip(originals, wants)]
        weights, values = _weights(p, *leaves)
        out = torch.matmul(weights * _saved_noise(p, weights.detach()), values).to(p.q.dtype)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
    result = [next(grads).contiguous() if (leaf is not None and leaf.requires_grad) else empty_grad(p.q)
              for leaf in leaves]
    return result[0], result[1], result[2], empty_grad(p.q), empty_grad(p.q), result[3], empty_grad(p.q)


def keep_mask(problem: AttentionProblem) -> Tensor:
    """(B, Hq, Tq, Tk) bool: the keep mask this backend's forward applied to `problem`, drawn again
    from its saved generator state (for a differentiable recomputation, e.g. double backward)."""
    p = problem
    keep = remembered_keep_mask(p)
    if keep is not None:
        return keep
    shape = (p.q.shape[0], p.q.shape[1], p.q.shape[2], p.k.shape[2])
    weights = torch.empty(shape, dtype=lse_dtype(p.q.dtype), device=p.q.device)
    return _noise(weights, p.dropout_p, _generator(p.dropout_seed)) != 0
