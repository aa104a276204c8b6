"""The low-level (out, lse) / (grad_out, out, lse) pairs, in one process, float64 reference.

Besides matching torch and autograd, the backward must accept merged statistics: run two halves
of the keys separately, merge them by log-sum-exp, and the two backward calls given the merged
(out, lse) must sum to the gradients of the whole call (what ring attention relies on).
"""
import pytest
import torch
import torch.nn.functional as F

import peer_attention as pa
from peer_attention import api
from peer_attention.distributed import (lowlevel, peer_backward, peer_forward, sdpa_backward,
                                        sdpa_forward)
from peer_attention.distributed.merge import merge_into

BACKEND = "reference"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("is_causal, gqa", [(False, False), (True, False), (True, True)])
def test_sdpa_pair_matches_torch_and_autograd(is_causal, gqa):
    q = rand(2, 4, 6, 5, seed=1)
    k, v = rand(2, 2 if gqa else 4, 6, 5, seed=2), rand(2, 2 if gqa else 4, 6, 3, seed=3)
    out, lse = sdpa_forward(q, k, v, is_causal=is_causal, enable_gqa=gqa, backend=BACKEND)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, is_causal=is_causal, enable_gqa=gqa)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    kk = k.repeat_interleave(2, dim=1) if gqa else k
    scores = q @ kk.transpose(-1, -2) / 5 ** 0.5
    if is_causal:
        scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-12)
    grad_out = rand(*want.shape, seed=4)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    got = sdpa_backward(grad_out, out, lse, q, k, v, is_causal=is_causal, enable_gqa=gqa,
                        backend=BACKEND)
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def _halves(tensors):
    half = tensors[0].shape[2] // 2
    return [[t[:, :, :half] for t in tensors], [t[:, :, half:] for t in tensors]]


def test_sdpa_backward_takes_merged_statistics():
    q, k, v = rand(1, 2, 5, 4, seed=1), rand(1, 2, 8, 4, seed=2), rand(1, 2, 8, 3, seed=3)
    parts = list(zip(*[_halves([k]), _halves([v])]))
    acc_out = torch.zeros(1, 2, 5, 3, dtype=torch.float64)
    acc_lse = torch.full((1, 2, 5), float("-inf"), dtype=torch.float64)
    for (kp,), (vp,) in parts:
        merge_into(acc_out, acc_lse, *sdpa_forward(q, kp, vp, backend=BACKEND))
    want_out, want_lse = sdpa_forward(q, k, v, backend=BACKEND)
    torch.testing.assert_close(acc_out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(acc_lse, want_lse, rtol=0, atol=1e-12)
    grad_out = rand(1, 2, 5, 3, seed=4)
    want = sdpa_backward(grad_out, want_out, want_lse, q, k, v, backend=BACKEND)
    grads = [sdpa_backward(grad_out, acc_out, acc_lse, q, kp, vp, backend=BACKEND)
             for (kp,), (vp,) in parts]
    torch.testing.assert_close(grads[0][0] + grads[1][0], want[0], rtol=0, atol=1e-12)
    for i in (1, 2):  # dk, dv: each half's keys get their own rows
        torch.testing.assert_close(torch.cat([grads[0][i], grads[1][i]], 2), want[i], rtol=0,
                                   atol=1e-12)


def _streams():
    queries = [rand(2, 2, n, 4, seed=10 + n) for n in (3, 5)]
    keys = [rand(2, 2, n, 4, seed=20 + n) for n in (4, 6)]
    values = [rand(2, 2, n, 3, seed=30 + n) for n in (4, 6)]
    return queries, keys, values


def test_peer_pair_joint_takes_merged_statistics():
    queries, keys, values = _streams()
    options = dict(gate=rand(2, 2, 1, 3, seed=5).sigmoid(), bias=rand(2, 2, 2, 2, seed=6),
                   kv_lengths=torch.tensor([[4, 2], [1, 6]]), backend=BACKEND)
    outs, lses = peer_forward(queries, keys, values, **options)
    leaves = [[t.clone().requires_grad_() for t in group] for group in (queries, keys, values)]
    gate, bias = (options[n].clone().requires_grad_() for n in ("gate", "bias"))
    want = pa.peer_attention(*leaves, gate=gate, bias=bias, kv_lengths=options["kv_lengths"],
                             backend=BACKEND)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=0, atol=1e-12)
    grad_outs = [rand(*o.shape, seed=40 + i) for i, o in enumerate(outs)]
    want_grads = torch.autograd.grad(want, sum(leaves, []) + [gate, bias], grad_outs)
    # the keys of every stream in two halves, each half its own call, kv_lengths per half
    halves = list(zip(*[_halves([k, v]) for k, v in zip(keys, values)]))
    lengths = [options["kv_lengths"].clamp(max=torch.tensor([2, 3])),
               (options["kv_lengths"] - torch.tensor([2, 3])).clamp(min=0)]
    total = None
    for half, kv_lengths in zip(halves, lengths):
        part_keys, part_values = [kv[0] for kv in half], [kv[1] for kv in half]
        grads = peer_backward(grad_outs, outs, lses, queries, part_keys, part_values,
                              **{**options, "kv_lengths": kv_lengths})
        total = grads if total is None else _combine(total, grads)
    dqs, dks, dvs, dgate, dbias = total
    got = dqs + dks + dvs + [dgate, dbias]
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def _combine(first, second):
    """Sum the query/gate/bias gradients of two key halves; put the key/value halves together."""
    dqs = [a + b for a, b in zip(first[0], second[0])]
    dks = [torch.cat([a, b], 2) for a, b in zip(first[1], second[1])]
    dvs = [torch.cat([a, b], 2) for a, b in zip(first[2], second[2])]
    return dqs, dks, dvs, first[3] + second[3], first[4] + second[4]


def test_peer_pair_peer_mode_own_statistics():
    queries, keys, values = _streams()
    gate = rand(2, 2, 2, 1, 3, seed=7)
    outs, lses = peer_forward(queries, keys, values, normalize="peer", gate=gate, is_causal=True,
                              backend=BACKEND)
    assert lses[0].shape == (2, 2, 2, 3)
    leaves = [[t.clone().requires_grad_() for t in group] for group in (queries, keys, values)]
    gate_leaf = gate.clone().requires_grad_()
    want = pa.peer_attention(*leaves, normalize="peer", gate=gate_leaf, is_causal=True,
                             backend=BACKEND)
    grad_outs = [rand(*o.shape, seed=50 + i) for i, o in enumerate(outs)]
    want_grads = torch.autograd.grad(want, sum(leaves, []) + [gate_leaf], grad_outs)
    dqs, dks, dvs, dgate, dbias = peer_backward(grad_outs, outs, lses, queries, keys, values,
                                                normalize="peer", gate=gate, is_causal=True,
                                                backend=BACKEND)
    assert dbias is None and dgate.shape == gate.shape
    for g, w in zip(dqs + dks + dvs + [dgate], want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_kernels_that_recompute_delta_refuse_merged_statistics():
    queries, keys, values = _streams()
    problem = api.peer_problem(queries, keys, values, normalize="peer")
    for backend in ("triton", "torch"):
        with pytest.raises(NotImplementedError, match=f"'{backend}': for normalize='peer'"):
            lowlevel.check_merged_statistics(backend, problem, [True] * 3 + [False] * 4)
    joint = api.peer_problem(queries, keys, values, gate=torch.ones(3))
    with pytest.raises(NotImplementedError, match="gate/bias"):
        lowlevel.check_merged_statistics("cuda", joint, [True] * 4 + [False] * 3)
    lowlevel.check_merged_statistics("cuda", joint, [True] * 3 + [False] * 4)  # Delta from out
    lowlevel.check_merged_statistics("torch", joint, [True] * 4 + [False] * 3)
    lowlevel.check_merged_statistics("reference", problem, [True] * 7)
    with pytest.raises(NotImplementedError, match="has not declared"):
        lowlevel.check_merged_statistics("new_backend", joint, [True] * 7)
