"""torch.autograd.gradcheck (finite differences, float64) through the public API.

The gradients come from the registered backward op (peer_attention::reference_bwd), so this
checks the whole autograd seam, not only the oracle's autograd.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import peer_attention as pa

F64 = torch.float64


def rand(*shape, gen, positive=False):
    t = torch.rand(*shape, dtype=F64, generator=gen) + 0.5 if positive else torch.randn(
        *shape, dtype=F64, generator=gen)
    return t.requires_grad_()


def streams(q_lens, kv_lens, hq=2, h=2, e=3, ev=2, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qs = [rand(batch, hq, n, e, gen=gen) for n in q_lens]
    ks = [rand(batch, h, m, e, gen=gen) for m in kv_lens]
    vs = [rand(batch, h, m, ev, gen=gen) for m in kv_lens]
    return qs, ks, vs, gen


def check_peer(q_lens, kv_lens, *, gate_shape=None, bias_shape=None, hq=2, h=2, fast_mode=False,
               **kwargs):
    qs, ks, vs, gen = streams(q_lens, kv_lens, hq=hq, h=h)
    gate = rand(*gate_shape, gen=gen, positive=True) if gate_shape else None
    bias = rand(*bias_shape, gen=gen) if bias_shape else None
    n = len(q_lens)
    extras = [t for t in (gate, bias) if t is not None]

    def fn(*tensors):
        q, k, v = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n]
        rest = list(tensors[3 * n:])
        kw = dict(kwargs)
        if gate is not None:
            kw["gate"] = rest.pop(0)
        if bias is not None:
            kw["bias"] = rest.pop(0)
        return tuple(pa.peer_attention(list(q), list(k), list(v), backend="reference", **kw))

    assert gradcheck(fn, (*qs, *ks, *vs, *extras), eps=1e-6, atol=1e-7, fast_mode=fast_mode)


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_two_streams(normalize):
    check_peer([3, 2], [2, 3], normalize=normalize)


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_gate(normalize):
    check_peer([2, 3], [3, 2], gate_shape=(1, 2, 2, 2, 2), normalize=normalize)


def test_broadcast_gate():
    check_peer([2, 3], [3, 2], gate_shape=(2, 1, 2))


def test_bias():
    check_peer([2, 3], [3, 2], bias_shape=(1, 2, 2, 2))


def test_broadcast_bias_and_gate():
    check_peer([2, 2], [3, 2], gate_shape=(2, 2, 1, 1), bias_shape=(2, 1))


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_causal_peers_kv_lengths_gqa(normalize):
    check_peer([3, 2, 2], [3, 2, 3], hq=2, h=1, enable_gqa=True, is_causal=True,
               peers=[[True, True, False], [False, True, True], [True, False, True]],
               kv_lengths=torch.tensor([[2, 1, 3]]), normalize=normalize,
               gate_shape=(1, 3, 3, 1, 2), fast_mode=True)  # random projections: 3x faster


def test_kv_lengths_with_bias():
    check_peer([2, 2], [3, 3], bias_shape=(1, 2, 2, 2), kv_lengths=torch.tensor([[1, 3]]))


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa(is_causal):
    qs, ks, vs, _ = streams([3], [4], hq=4, h=2)

    def fn(q, k, v):
        return pa.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True,
                                               scale=0.8, backend="reference")

    assert gradcheck(fn, (qs[0], ks[0], vs[0]), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask_shape", [(1, 2, 3, 4), (3, 1), (4,)], ids=str)
def test_sdpa_float_mask(mask_shape):
    qs, ks, vs, gen = streams([3], [4])
    mask = rand(*mask_shape, gen=gen)

    def fn(q, k, v, m):
        return pa.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="reference")

    assert gradcheck(fn, (qs[0], ks[0], vs[0], mask), eps=1e-6, atol=1e-7)


def test_sdpa_leading_dims_bool_mask():
    gen = torch.Generator().manual_seed(1)
    q, k, v = rand(2, 1, 2, 3, 3, gen=gen), rand(2, 1, 2, 4, 3, gen=gen), rand(2, 1, 2, 4, 2, gen=gen)
    mask = torch.rand(3, 4, generator=gen) > 0.3

    def fn(q, k, v):
        return pa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")

    assert gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)
