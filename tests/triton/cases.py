"""Problem makers for the Triton backend's tests (tiny shapes: they run under the interpreter)."""
from __future__ import annotations

import torch

import peer_attention as pa
from peer_attention.reference import peer_attention_reference, sdpa_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def randn(gen, *shape, requires_grad=True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)


def peer_case(*, q_lens, kv_lens, batch=1, q_heads=2, kv_heads=2, head_dim=20, value_dim=12,
              peers=None, gate_shape=None, bias_shape=None, kv_lengths=None, normalize="joint",
              is_causal=False, seed=0, reference_peers=None):
    """(kernel_fn, reference_fn, inputs, names) for assert_matches_reference on peer_attention.
    `reference_peers`: a peer table for the reference only (an equivalent problem)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(q_lens)
    queries = [randn(gen, batch, q_heads, L, head_dim) for L in q_lens]
    keys = [randn(gen, batch, kv_heads, M, head_dim) for M in kv_lens]
    values = [randn(gen, batch, kv_heads, M, value_dim) for M in kv_lens]
    inputs = queries + keys + values
    names = [f"q{s}" for s in range(n)] + [f"k{s}" for s in range(n)] + [f"v{s}" for s in range(n)]
    has_gate, has_bias = gate_shape is not None, bias_shape is not None
    if has_gate:  # positive gates around 1, like sigmoid gates
        inputs.append((0.5 + torch.rand(*gate_shape, generator=gen, dtype=torch.float64)).requires_grad_())
        names.append("gate")
    if has_bias:
        inputs.append(randn(gen, *bias_shape))
        names.append("bias")
    kw = dict(peers=peers, normalize=normalize, is_causal=is_causal, kv_lengths=kv_lengths)

    def split(args):
        streams = list(args[:3 * n])
        rest = list(args[3 * n:])
        gate = rest.pop(0) if has_gate else None
        bias = rest.pop(0) if has_bias else None
        return streams[:n], streams[n:2 * n], streams[2 * n:], gate, bias

    def kernel_fn(*args):
        qs, ks, vs, gate, bias = split(args)
        return pa.peer_attention(qs, ks, vs, gate=gate, bias=bias, enable_gqa=q_heads != kv_heads,
                                 backend="triton", **kw)

    def reference_fn(*args):
        qs, ks, vs, gate, bias = split(args)
        ref_kw = dict(kw, peers=reference_peers) if reference_peers is not None else kw
        return peer_attention_reference(qs, ks, vs, gate=gate, bias=bias, **ref_kw)

    return kernel_fn, reference_fn, inputs, names


def sdpa_case(*, q_len, kv_len, lead=(1, 2), kv_heads=None, head_dim=20, value_dim=12,
              mask=None, is_causal=False, seed=0):
    """SDPA through the public drop-in; `mask` is a float64 tensor (float mask, gets a
    gradient if it requires grad) or a bool tensor."""
    gen = torch.Generator().manual_seed(seed)
    q_heads = lead[-1]
    kv_heads = kv_heads or q_heads
    kv_lead = tuple(lead[:-1]) + (kv_heads,)
    inputs = [randn(gen, *lead, q_len, head_dim), randn(gen, *kv_lead, kv_len, head_dim),
              randn(gen, *kv_lead, kv_len, value_dim)]
    names = ["q", "k", "v"]
    if mask is not None:
        inputs.append(mask)
        if mask.requires_grad:
            names.append("mask")
    gqa = kv_heads != q_heads

    def kernel_fn(q, k, v, *m):
        return pa.scaled_dot_product_attention(q, k, v, attn_mask=m[0] if m else None,
                                               is_causal=is_causal, enable_gqa=gqa, backend="triton")

    def reference_fn(q, k, v, *m):
        return sdpa_reference(q, k, v, attn_mask=m[0] if m else None, is_causal=is_causal,
                              enable_gqa=gqa)

    return kernel_fn, reference_fn, inputs, names
