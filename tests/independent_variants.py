"""The SPEC section 9 variants written once more, densely and in float64, straight from the
SPEC's words (no peer_attention code): the oracle that the reference and every backend serving
a variant are checked against.

One attention "pair" at a time: q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev). Streams and
varlen sequences are composed from pairs by the tests.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def band(q_len: int, kv_len: int, offset: int, left: int, right: int) -> torch.Tensor:
    """(L, S) bool: query i may see key j iff i + offset - left <= j <= i + offset + right
    (-1 = unbounded on that side)."""
    i = torch.arange(q_len)[:, None] + offset
    j = torch.arange(kv_len)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    return allowed


def alibi_bias(slopes: torch.Tensor, q_len: int, kv_len: int, offset: int) -> torch.Tensor:
    """(B, Hq, L, S): - slope * |i + offset - j|."""
    distance = (torch.arange(q_len)[:, None] + offset - torch.arange(kv_len)[None, :]).abs()
    return -slopes.double()[:, :, None, None] * distance.double()


def attention(q, k, v, *, scale, allowed=None, additive=None, softcap=0.0, sinks=None):
    """Returns (out (B, Hq, L, Ev), lse (B, Hq, L)). GQA: query head h reads head h // (Hq/H).
    `allowed` broadcastable to (B, Hq, L, S), `additive` added after the softcap, `sinks` (Hq,)
    a value-less logit in every row's normaliser. A row with nothing in its normaliser gives 0."""
    batch, num_q_heads, q_len, _ = q.shape
    kv_heads = torch.div(torch.arange(num_q_heads), num_q_heads // k.shape[1], rounding_mode="floor")
    k, v = k[:, kv_heads], v[:, kv_heads]
    z = scale * torch.einsum("bhle,bhse->bhls", q, k)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    if additive is not None:
        z = z + additive.to(z.dtype)
    if allowed is not None:
        z = z.masked_fill(~allowed, NEG_INF)
    sink = (sinks.to(z.dtype)[None, :, None, None].expand(batch, num_q_heads, q_len, 1)
            if sinks is not None else z.new_full((batch, num_q_heads, q_len, 1), NEG_INF))
    logits = torch.cat([z, sink], dim=-1)
    top = logits.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    total = e.sum(-1, keepdim=True)
    weights = e[..., :-1] / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.einsum("bhls,bhse->bhle", weights, v)
    lse = (torch.log(total) + top).squeeze(-1)
    return out, lse


def flash_layout_attention(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0,
                           alibi_slopes=None, sinks=None):
    """flash-attn's function in its own layout: q (B, L, Hq, E) ... -> ((B, L, Hq, Ev), lse
    (B, Hq, L)), masks and ALiBi aligned bottom-right (offset S - L)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q_len, kv_len = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window
    if causal:
        right = 0
    offset = kv_len - q_len
    additive = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.expand(q.shape[0], q.shape[1])
        additive = alibi_bias(slopes, q_len, kv_len, offset)
    out, lse = attention(q, k, v, scale=scale, allowed=band(q_len, kv_len, offset, left, right),
                         additive=additive, softcap=softcap, sinks=sinks)
    return out.transpose(1, 2), lse
