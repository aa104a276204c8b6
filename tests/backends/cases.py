"""Problem makers for backend tests: (kernel_fn, reference_fn, inputs, names) for
tests.helpers.assert_matches_reference, with the backend under test as a parameter."""
from __future__ import annotations

import itertools

import torch

import peer_attention as pa
from peer_attention.reference import peer_attention_reference, sdpa_reference


def randn(gen, *shape, requires_grad=True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)


def sdpa_case(backend, *, q_len, kv_len, lead=(1, 2), kv_heads=None, head_dim=16, value_dim=16,
              mask=None, is_causal=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_heads = lead[-1]
    kv_lead = tuple(lead[:-1]) + (kv_heads or q_heads,)
    inputs = [randn(gen, *lead, q_len, head_dim), randn(gen, *kv_lead, kv_len, head_dim),
              randn(gen, *kv_lead, kv_len, value_dim)]
    names = ["q", "k", "v"]
    if mask is not None:
        inputs.append(mask)
        if mask.requires_grad:
            names.append("mask")
    gqa = kv_lead[-1] != q_heads

    def kernel_fn(q, k, v, *m):
        return pa.scaled_dot_product_attention(q, k, v, attn_mask=m[0] if m else None,
                                               is_causal=is_causal, enable_gqa=gqa, backend=backend)

    def reference_fn(q, k, v, *m):
        return sdpa_reference(q, k, v, attn_mask=m[0] if m else None, is_causal=is_causal,
                              enable_gqa=gqa)

    return kernel_fn, reference_fn, inputs, names


def peer_case(backend, *, q_lens, kv_lens, batch=1, q_heads=2, kv_heads=2, head_dim=16,
              value_dim=12, peers=None, gate_shape=None, bias_shape=None, kv_lengths=None,
              normalize="joint", is_causal=False, seed=0, reference_peers=None, scale=None):
    gen = torch.Generator().manual_seed(seed)
    n = len(q_lens)
    inputs = ([randn(gen, batch, q_heads, L, head_dim) for L in q_lens]
              + [randn(gen, batch, kv_heads, M, head_dim) for M in kv_lens]
              + [randn(gen, batch, kv_heads, M, value_dim) for M in kv_lens])
    names = [f"{r}{s}" for r in "qkv" for s in range(n)]
    if gate_shape is not None:  # positive gates around 1, like sigmoid gates
        inputs.append((0.5 + torch.rand(*gate_shape, generator=gen, dtype=torch.float64)).requires_grad_())
        names.append("gate")
    if bias_shape is not None:
        inputs.append(randn(gen, *bias_shape))
        names.append("bias")
    kw = dict(peers=peers, normalize=normalize, is_causal=is_causal, kv_lengths=kv_lengths,
              scale=scale)

    def split(args):
        rest = list(args[3 * n:])
        gate = rest.pop(0) if gate_shape is not None else None
        bias = rest.pop(0) if bias_shape is not None else None
        return list(args[:n]), list(args[n:2 * n]), list(args[2 * n:3 * n]), gate, bias

    def kernel_fn(*args):
        qs, ks, vs, gate, bias = split(args)
        return pa.peer_attention(qs, ks, vs, gate=gate, bias=bias, enable_gqa=q_heads != kv_heads,
                                 backend=backend, **kw)

    def reference_fn(*args):
        qs, ks, vs, gate, bias = split(args)
        ref_kw = dict(kw, peers=reference_peers) if reference_peers is not None else kw
        return peer_attention_reference(qs, ks, vs, gate=gate, bias=bias, **ref_kw)

    return kernel_fn, reference_fn, inputs, names


# every combination of the peer features (bias only with the joint normalisation), for the
# backends' feature-grid tests
FEATURES = [
    dict(normalize=n, is_causal=c, gate=g, bias=b, kv_lengths=k, gqa=h)
    for n, c, g, b, k, h in itertools.product(("joint", "peer"), *[(False, True)] * 5)
    if not (n == "peer" and b)
]


def feature_id(f) -> str:
    return "-".join([f["normalize"]] + [k for k in ("is_causal", "gate", "bias", "kv_lengths", "gqa") if f[k]])
