"""Peer attention computed another way: torch's own scaled_dot_product_attention, one call per
stream (joint) or per stream pair (peer), with gate, bias, peers, causal and kv_lengths expressed
as pre-scaled values and an additive float mask. Nothing here uses peer_attention's code, so
the tests can compare the package against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def _full(t, batch, num_streams, num_q_heads, value_dim=None):
    if t is None:
        return None
    shape = (batch, num_streams, num_streams, num_q_heads) + ((value_dim,) if value_dim else ())
    return t.expand(shape)


def _kv_heads_to_q_heads(t, num_q_heads):
    return t.repeat_interleave(num_q_heads // t.shape[1], dim=1)


def _pair_mask(q_len, kv_len, s, p, batch, num_q_heads, bias, is_causal, kv_lengths, dtype):
    """The additive (B, Hq, L_s, M_p) mask of stream pair (s, p)."""
    mask = torch.zeros(batch, num_q_heads, q_len, kv_len, dtype=dtype)
    if bias is not None:
        mask = mask + bias[:, s, p, :, None, None].to(dtype)
    blocked = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    if is_causal and s == p:
        rows = torch.arange(q_len)[:, None]
        cols = torch.arange(kv_len)[None, :]
        blocked = blocked | (cols > rows)
    if kv_lengths is not None:
        cols = torch.arange(kv_len)
        blocked = blocked | (cols[None, :] >= kv_lengths[:, p, None].cpu())[:, None, None, :]
    return mask.masked_fill(blocked, NEG_INF)


def _peer_table(peers, num_streams):
    if peers is None:
        return [[True] * num_streams for _ in range(num_streams)]
    if isinstance(peers, torch.Tensor):
        return peers.tolist()
    return [[bool(x) for x in row] for row in peers]


def peer_attention_via_sdpa(queries, keys, values, *, peers=None, gate=None, bias=None,
                            normalize="joint", is_causal=False, kv_lengths=None, scale=None,
                            enable_gqa=False):
    del enable_gqa  # the head counts decide; validation is not this function's job
    num_streams = len(queries)
    batch, num_q_heads, _, _ = queries[0].shape
    value_dim = values[0].shape[-1]
    table = _peer_table(peers, num_streams)
    gate = _full(gate, batch, num_streams, num_q_heads, value_dim)
    bias = _full(bias, batch, num_streams, num_q_heads)
    outputs = []
    for s, q in enumerate(queries):
        attended = [p for p in range(num_streams) if table[s][p]]
        ks, vs, masks = [], [], []
        for p in attended:
            k = _kv_heads_to_q_heads(keys[p], num_q_heads)
            v = _kv_heads_to_q_heads(values[p], num_q_heads)
            if gate is not None:
                v = v * gate[:, s, p, :, None, :].to(v.dtype)
            ks.append(k)
            vs.append(v)
            masks.append(_pair_mask(q.shape[2], k.shape[2], s, p, batch, num_q_heads, bias,
                                    is_causal, kv_lengths, q.dtype))
        out = q.new_zeros(batch, num_q_heads, q.shape[2], value_dim)
        if attended and normalize == "joint":
            out = out + F.scaled_dot_product_attention(
                q, torch.cat(ks, 2), torch.cat(vs, 2), attn_mask=torch.cat(masks, -1), scale=scale)
        elif normalize == "peer":
            for k, v, mask in zip(ks, vs, masks):
                out = out + F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        outputs.append(out)
    return outputs
