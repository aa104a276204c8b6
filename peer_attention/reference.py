"""Plain-PyTorch semantics of both operations: the oracle every kernel is tested against.

Everything here is written for clarity, not speed: it materialises the L x M score matrix of
each stream pair, works in the dtype it is given (float64 included) and is differentiable by
autograd, double backward included. Arguments are assumed valid (the public API validates).

A row with nothing to attend to (all keys masked, no peers, an empty peer) gets weight 0
everywhere, so it contributes 0 to the output and 0 to every gradient, never NaN.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .problem import AttentionProblem, remembered_keep_mask

__all__ = ["safe_softmax", "peer_attention_reference", "sdpa_reference", "dropout_keep_mask",
           "problem_reference", "problem_keep_mask", "repeat_kv_heads", "compute_dtype"]

# computed in float32 and rounded once at the end, as torch's math SDPA does on the CPU
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the oracle computes a call of `dtype` in: float32 for 16-bit inputs."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def safe_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax that gives 0 (with 0 gradient) on rows whose every entry is -inf."""
    if scores.shape[dim] == 0:  # no keys at all (S = 0): amax below would raise on the empty dim
        return scores * 0.0  # an empty tensor that stays in the autograd graph
    row_max = scores.amax(dim, keepdim=True).detach()
    # softmax is shift invariant, so the detached shift changes no gradient; a row of -inf has
    # max -inf, which would make exp(-inf - -inf) = NaN: shift it by 0 instead.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim, keepdim=True)
    # dividing by 1 where total == 0 keeps the backward of the division finite as well
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def _logsumexp(scores: Tensor, dim: int = -1) -> Tensor:
    """log-sum-exp that is -inf on rows of all -inf, with a 0 (not NaN) gradient there: the
    reference backend's backward differentiates it (see backends/reference.py)."""
    if scores.shape[dim] == 0:
        return scores.sum(dim) - float("inf")
    live = torch.isfinite(scores.amax(dim, keepdim=True).detach())
    total = torch.logsumexp(scores.masked_fill(~live, 0.0), dim)
    return total.masked_fill(~live.squeeze(dim), float("-inf"))


def dropout_keep_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
    """Bernoulli(1 - p) keep mask drawn from a generator seeded with `seed` (reproducible)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= dropout_p


def repeat_kv_heads(t: Tensor, num_q_heads: int) -> Tensor:
    """GQA: query head h reads key/value head h // (Hq / H)."""
    heads = t.shape[1]
    if heads == num_q_heads or heads == 0:  # (zero key/value heads: zero query heads too)
        return t
    return t.repeat_interleave(num_q_heads // heads, dim=1)


def problem_keep_mask(problem: AttentionProblem) -> Tensor:
    """(B, Hq, Tq, Tk) bool: the reference's dropout keep mask for `problem`, the one its forward
    left on the seed when it left one, else drawn again from the seed (the same numbers)."""
    keep = remembered_keep_mask(problem)
    if keep is not None:
        return keep
    q, k = problem.q, problem.k
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return dropout_keep_mask(shape, problem.dropout_p, int(problem.dropout_seed[0]), q.device)


def problem_reference(problem: AttentionProblem, q, k, v, gate, bias, attn_mask, sinks,
                      dropout_mask: Optional[Tensor] = None, return_lse: bool = False):
    """peer_attention_reference on a normalised problem, with its tensors replaced by the given
    ones (differentiable leaves, or the problem's own cast to the compute dtype): the per-stream
    outputs (B, Hq, L_s, Ev), with their lses when return_lse."""
    p = problem
    return peer_attention_reference(
        q.split(list(p.q_lens), dim=2), k.split(list(p.kv_lens), dim=2),
        v.split(list(p.kv_lens), dim=2),
        peers=p.peers_nested(), gate=gate, bias=bias, normalize=p.normalize,
        is_causal=p.is_causal, kv_lengths=p.kv_lengths, scale=p.scale, attn_mask=attn_mask,
        dropout_mask=dropout_mask, dropout_p=p.dropout_p, return_lse=return_lse,
        window=(p.window_left, p.window_right), bottom_right=p.bottom_right, softcap=p.softcap,
        alibi_slopes=p.alibi_slopes, sinks=sinks,
    )


def peer_attention_reference(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    *,
    peers=None,
    gate: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    normalize: str = "joint",
    is_causal: bool = False,
    kv_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    window=(-1, -1),
    bottom_right: bool = False,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
):
    """Multi-stream peer attention, SPEC section 3, straight from the formulas.

    Stream s: Q_s (B, Hq, L_s, E), K_s (B, H, M_s, E), V_s (B, H, M_s, Ev). `gate` broadcasts to
    (B, S, S, Hq, Ev), `bias` to (B, S, S, Hq). GQA is implied by Hq != H.

    Two extras serve the one-stream (SDPA) case only: `attn_mask` broadcastable to
    (B, Hq, L, M), bool (True = may attend) or float (added to the scores), and dropout given
    as an explicit `dropout_mask` of kept weights (B, Hq, L, M) with its rate `dropout_p`.

    Variants (SPEC section 9): `softcap` > 0 caps the scaled scores, z = softcap *
    tanh(scale * q.k / softcap), before bias and masks. On the self pairs (s == p), with the
    diagonal offset off = M_s - L_s when `bottom_right` else 0: `window=(left, right)` lets query
    i see key j iff i + off - left <= j <= i + off + right (-1 unbounded; `is_causal` means
    right = 0) and `alibi_slopes` (B, Hq) adds - slope * |i + off - j|. `sinks` (Hq,), joint
    only: a per-head logit that joins every row's normaliser and carries no value (the returned
    lse includes it).

    Returns the list of S outputs (B, Hq, L_s, Ev); with `return_lse` also the log-sum-exp of
    the scores per row: (B, Hq, L_s) for "joint", (B, Hq, S, L_s) for "peer" (-inf for peers
    not attended).
    """
    num_streams = len(queries)
    batch, num_q_heads, _, head_dim = queries[0].shape
    value_dim = values[0].shape[-1]
    if scale is None:
        scale = head_dim ** -0.5
    if peers is None:
        peers = [[True] * num_streams for _ in range(num_streams)]
    if gate is not None:
        gate = gate.expand(batch, num_streams, num_streams, num_q_heads, value_dim)
    if bias is not None:
        bias = bias.expand(batch, num_streams, num_streams, num_q_heads)
    if (attn_mask is not None or dropout_mask is not None) and num_streams != 1:
        raise ValueError("attn_mask and dropout are defined for one stream only")

    outputs, lses = [], []
    for s, query in enumerate(queries):
        q_len = query.shape[2]
        scores, peer_values, attended = [], [], []
        for p in range(num_streams):
            if not bool(peers[s][p]):
                continue
            key = repeat_kv_heads(keys[p], num_q_heads)
            value = repeat_kv_heads(values[p], num_q_heads)
            kv_len = key.shape[2]
            z = scale * (query @ key.transpose(-1, -2))  # (B, Hq, L, M)
            if softcap > 0:
                z = softcap * torch.tanh(z / softcap)
            if bias is not None:
                z = z + bias[:, s, p, :, None, None]
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
            if s == p:
                # d = j - (i + off): the key's distance from the (aligned) diagonal
                off = kv_len - q_len if bottom_right else 0
                d = (torch.arange(kv_len, device=query.device)[None, :]
                     - torch.arange(q_len, device=query.device)[:, None] - off)
                left, right = window
                if is_causal:
                    right = 0 if right < 0 else min(right, 0)
                if right >= 0:
                    allowed = allowed & (d <= right)
                if left >= 0:
                    allowed = allowed & (d >= -left)
                if alibi_slopes is not None:
                    slopes = alibi_slopes.expand(batch, num_q_heads).to(z.dtype)
                    z = z - slopes[:, :, None, None] * d.abs().to(z.dtype)
            allowed = allowed.expand(batch, num_q_heads, q_len, kv_len)
            if kv_lengths is not None:
                positions = torch.arange(kv_len, device=query.device)
                allowed = allowed & (positions < kv_lengths[:, p, None, None, None].to(query.device))
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    allowed = allowed & attn_mask
                else:
                    z = z + attn_mask
            z = z.masked_fill(~allowed, float("-inf"))
            if gate is not None:
                value = value * gate[:, s, p, :, None, :]
            scores.append(z)
            peer_values.append(value)
            attended.append(p)

        empty_out = query.new_zeros(batch, num_q_heads, q_len, value_dim)
        if normalize == "joint":
            if sinks is not None:  # a value-less column in every row's softmax
                sink = sinks.to(query.dtype)[None, :, None, None].expand(batch, -1, q_len, 1)
                z = torch.cat(scores + [sink], dim=-1)
                weights = safe_softmax(z)[..., :-1]
                out = weights @ torch.cat(peer_values, dim=2) if scores else empty_out
                lse = _logsumexp(z)
            elif scores:
                z = torch.cat(scores, dim=-1)
                weights = safe_softmax(z)
                if dropout_mask is not None:
                    weights = weights * dropout_mask / (1.0 - dropout_p)
                out = weights @ torch.cat(peer_values, dim=2)
                lse = _logsumexp(z)
            else:
                out = empty_out
                lse = query.new_full((batch, num_q_heads, q_len), float("-inf"))
        elif normalize == "peer":
            out = empty_out
            lse = query.new_full((batch, num_q_heads, num_streams, q_len), float("-inf"))
            lse_per_peer = {}
            for p, z, value in zip(attended, scores, peer_values):
                out = out + safe_softmax(z) @ value  # the gate is already folded into `value`
                lse_per_peer[p] = _logsumexp(z)
            if lse_per_peer:
                lse = torch.stack(
                    [lse_per_peer.get(p, lse[:, :, p]) for p in range(num_streams)], dim=2
                )
        else:
            raise ValueError(f"normalize must be 'joint' or 'peer', got {normalize!r}")
        outputs.append(out)
        lses.append(lse)
    return (outputs, lses) if return_lse else outputs


def sdpa_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's semantics, in plain PyTorch.

    Shapes (N, ..., Hq, L, E), (N, ..., H, S, E), (N, ..., H, S, Ev). Dropout with p > 0 needs
    an explicit `dropout_mask` of kept weights, broadcastable to (N, ..., Hq, L, S), so that a
    test can reproduce it; `enable_gqa` is implied by the head counts.
    """
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("sdpa_reference needs an explicit dropout_mask when dropout_p > 0")
    lead = query.shape[:-2]
    q_len, kv_len = query.shape[-2], key.shape[-2]
    num_q_heads = query.shape[-3] if query.dim() >= 3 else 1
    num_kv_heads = key.shape[-3] if key.dim() >= 3 else 1

    # the batch size is spelled out: reshape(-1, ...) is ambiguous when a tensor is empty
    batch = 1
    for n in query.shape[:-3]:
        batch *= n

    def to_4d(t: Tensor, heads: int) -> Tensor:
        return t.reshape(batch, heads, t.shape[-2], t.shape[-1])

    def mask_4d(m: Optional[Tensor]) -> Optional[Tensor]:
        if m is None:
            return None
        return m.expand(*lead, q_len, kv_len).reshape(batch, num_q_heads, q_len, kv_len)

    out = peer_attention_reference(
        [to_4d(query, num_q_heads)],
        [to_4d(key, num_kv_heads)],
        [to_4d(value, num_kv_heads)],
        is_causal=is_causal,
        scale=scale,
        attn_mask=mask_4d(attn_mask),
        dropout_mask=mask_4d(dropout_mask),
        dropout_p=dropout_p,
    )[0]
    return out.reshape(*lead, q_len, value.shape[-1])
