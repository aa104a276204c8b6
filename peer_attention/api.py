"""The public functions: validate, normalise the layout, dispatch, restore the caller's layout."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import dispatch
from .flash_attn import causal_band
from .problem import AttentionProblem
from .validation import check_peer, check_peer_variants, check_sdpa


def _as_4d(t: Tensor, lead_numel: int) -> Tensor:
    """(N, ..., H, L, E) -> (B, H, L, E) without a copy when the strides allow."""
    if t.dim() == 4:
        return t
    return t.reshape(lead_numel, t.shape[-3], t.shape[-2], t.shape[-1])


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def broadcast_in_fp32(t: Tensor, shape) -> Tensor:
    """t expanded to `shape`. A 16-bit t that requires grad and is broadcast is first cast to
    float32 (a copy of the small tensor only): the backward's sum over the broadcast dims then runs
    in float32 and is rounded once, not term by term."""
    if t.requires_grad and t.dtype in _LOW_PRECISION and tuple(t.shape) != tuple(shape):
        t = t.float()
    return t.expand(shape)


def sdpa_problem(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False) -> AttentionProblem:
    """Validate an SDPA call and express it as the one-stream normalised problem."""
    dropout_p, scale = check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa)
    lead = query.shape[:-3]
    lead_numel = 1
    for n in lead:
        lead_numel *= n
    q = _as_4d(query, lead_numel)
    k = _as_4d(key, lead_numel)
    v = _as_4d(value, lead_numel)
    mask = None
    if attn_mask is not None:
        full = tuple(query.shape[:-1]) + (key.shape[-2],)
        mask = (broadcast_in_fp32(attn_mask, full) if attn_mask.dtype != torch.bool
                else attn_mask.expand(full))
        if len(full) != 4:  # merging expanded leading dims copies only when strides forbid a view
            mask = mask.reshape(lead_numel, *full[-3:])
    return AttentionProblem(
        q, k, v, (q.shape[2],), (k.shape[2],), (1,), None, None, None, mask,
        dispatch.draw_dropout_seed() if dropout_p > 0 else None,
        dropout_p, is_causal, scale, "joint",
    )


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (SPEC section 2).

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) ->
    (N, ..., Hq, L, Ev). `backend`: None/"auto", "cuda", "triton" or "reference".
    """
    problem = sdpa_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    out, _ = dispatch.run(problem, backend)
    return out.view(*query.shape[:-1], value.shape[-1])


def peer_problem(queries, keys, values, *, peers=None, gate=None, bias=None, normalize="joint",
                 is_causal=False, kv_lengths=None, scale=None, enable_gqa=False, softcap=0.0,
                 window=None, sinks=None) -> AttentionProblem:
    """Validate a peer_attention call and pack its streams into the normalised problem."""
    queries, keys, values, peers_flat, scale = check_peer(
        queries, keys, values, peers, gate, bias, normalize, is_causal, kv_lengths, scale,
        enable_gqa,
    )
    softcap, window, sinks = check_peer_variants(softcap, window, sinks, normalize,
                                                 queries[0].shape[1], queries[0])
    is_causal, window_left, window_right = causal_band(is_causal, window)
    num_streams = len(queries)
    q0 = queries[0]
    batch, num_q_heads = q0.shape[0], q0.shape[1]
    value_dim = values[0].shape[3]
    if num_streams == 1:
        q, k, v = q0, keys[0], values[0]
    else:  # one packed buffer per role; the caller's tensors are only read
        q, k, v = torch.cat(queries, dim=2), torch.cat(keys, dim=2), torch.cat(values, dim=2)
    if gate is not None:
        gate = broadcast_in_fp32(gate, (batch, num_streams, num_streams, num_q_heads, value_dim))
    if bias is not None:
        bias = broadcast_in_fp32(bias, (batch, num_streams, num_streams, num_q_heads))
    if kv_lengths is not None and kv_lengths.device != q.device:
        kv_lengths = kv_lengths.to(q.device)
    return AttentionProblem(
        q, k, v, tuple([t.shape[2] for t in queries]), tuple([t.shape[2] for t in keys]), peers_flat,
        gate, bias, kv_lengths, None, None, 0.0, is_causal, scale, normalize,
        window_left, window_right, False, softcap, None, sinks,
    )


def peer_attention(queries: Sequence[Tensor], keys: Sequence[Tensor], values: Sequence[Tensor], *,
                   peers=None, gate: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   normalize: str = "joint", is_causal: bool = False,
                   kv_lengths: Optional[Tensor] = None, scale: Optional[float] = None,
                   enable_gqa: bool = False, backend: Optional[str] = None, softcap: float = 0.0,
                   window=None, sinks: Optional[Tensor] = None) -> List[Tensor]:
    """Multi-stream peer attention (SPEC section 3); returns S tensors (B, Hq, L_s, Ev).

    Variants (SPEC section 9): `softcap` > 0 caps every pair's scores, z = softcap *
    tanh(scale * q.k / softcap); `window=(left, right)` bands the self pairs, top-left aligned
    like is_causal (query i sees key j iff i - left <= j <= i + right, -1 = unbounded);
    `sinks` (Hq,), normalize="joint" only: a per-head logit in every row's softmax, no value."""
    problem = peer_problem(queries, keys, values, peers=peers, gate=gate, bias=bias,
                           normalize=normalize, is_causal=is_causal, kv_lengths=kv_lengths,
                           scale=scale, enable_gqa=enable_gqa, softcap=softcap, window=window,
                           sinks=sinks)
    out, _ = dispatch.run(problem, backend)
    if problem.num_streams == 1:
        return [out]
    return list(out.split_with_sizes(problem.q_lens, dim=2))
