"""The `torch` backend's decode (flash_attn_with_kvcache): torch's own kernels over a gathered
cache, on the CPU and on devices our kernels do not serve.

Each sequence's keys are gathered out of the cache (contiguous rows or pages) into one padded
(B, H, n_max, E) batch, right-aligned: the keys of sequence b end at the last column, so its
bottom-right alignment (off = n_b - Lq) is the padded batch's own (n_max - Lq) and one call serves
every sequence. The left padding, the band (window/causal) and ALiBi become one additive float
mask (B, Hq or 1, Lq, n_max), small for decode shapes; the call is then the torch backend's own
(torch's fused SDPA kernels, sinks merged by log-sum-exp). softcap, which no fused torch kernel
applies, runs the same gathered batch through plain torch ops (the reference's formulas).
"""
from __future__ import annotations

import torch

from ..decode_problem import DecodeProblem, gather_keys
from ..problem import AttentionProblem, lse_dtype
from ..reference import peer_attention_reference

NEG_INF = float("-inf")


def _mask(p: DecodeProblem, valid, n_max: int, compute) -> torch.Tensor:
    """Additive (B, Hq or 1, Lq, n_max) mask: -inf on padding and outside the band, ALiBi."""
    q_len = p.q.shape[1]
    device = p.q.device
    counts = p.seqlens.to(device=device, dtype=torch.long)[:, None, None, None]
    # key index j of column c is c - (n_max - n_b); d = j - (i + off) is its distance from the
    # diagonal, off = n_b - Lq bottom-right, else 0
    column = torch.arange(n_max, device=device)[None, None, None, :]
    row = torch.arange(q_len, device=device)[None, None, :, None]
    key = column - (n_max - counts)
    d = key - row - (counts - q_len if p.bottom_right else 0)
    visible = valid[:, None, None, :]
    if p.window_right >= 0:
        visible = visible & (d <= p.window_right)
    if p.window_left >= 0:
        visible = visible & (d >= -p.window_left)
    mask = torch.zeros(visible.shape, dtype=compute, device=device).masked_fill_(~visible, NEG_INF)
    if p.alibi_slopes is not None:
        mask = mask - p.alibi_slopes.to(compute)[:, :, None, None] * d.abs().to(compute)
    return mask


def torch_decode(problem: DecodeProblem, forward):
    """(out (B, Lq, Hq, Ev), lse (B, Hq, Lq)); `forward` is the torch backend's forward of an
    AttentionProblem."""
    p = problem
    q = p.q
    batch, q_len, num_q_heads, _ = q.shape
    compute = lse_dtype(q.dtype)
    n_max = max(p.max_seqlen, 1)  # one fully masked column when every sequence is empty
    sliced = p.plain_slice and p.max_seqlen > 0
    if sliced:  # equal lengths from row b's start: a view, no padding
        k, v = p.k_cache[:batch, :n_max], p.v_cache[:batch, :n_max]
        valid = torch.ones(1, n_max, dtype=torch.bool, device=q.device)
    else:
        k, v, valid = gather_keys(p, n_max, align_right=True)
    k, v, qt = k.transpose(1, 2), v.transpose(1, 2), q.transpose(1, 2)
    mask = None
    if not sliced or p.has_band or p.alibi_slopes is not None or p.softcap > 0:
        mask = _mask(p, valid, n_max, compute).expand(batch, num_q_heads, q_len, n_max)
    if p.softcap > 0:
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        (out,), (lse,) = peer_attention_reference(
            [qt.to(work)], [k.to(work)], [v.to(work)], scale=p.scale, attn_mask=mask.to(work),
            softcap=p.softcap, sinks=None if p.sinks is None else p.sinks.to(work),
            return_lse=True)
        out = out.to(q.dtype)
    else:
        attention = AttentionProblem(
            q=qt, k=k, v=v, q_lens=(q_len,), kv_lens=(n_max,), peers=(1,), gate=None, bias=None,
            kv_lengths=None, attn_mask=mask, dropout_seed=None, dropout_p=0.0, is_causal=False,
            scale=p.scale, normalize="joint", sinks=p.sinks)
        out, lse = forward(attention)
    return out.transpose(1, 2).contiguous(), lse.to(compute).contiguous()
