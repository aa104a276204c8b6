"""peer_attention (backend="reference") against identities that hold by SPEC section 3, with
torch's scaled_dot_product_attention as the independent computation. Forward and gradients,
float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peer_attention as pa
from tests.helpers import assert_matches_reference, randn
from tests.independent import peer_attention_via_sdpa

F64 = torch.float64
ATOL = 1e-10


def make_streams(q_lens, kv_lens, batch=2, hq=2, h=2, e=4, ev=3, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, dtype=F64, generator=gen).requires_grad_()

    queries = [rnd(batch, hq, n, e) for n in q_lens]
    keys = [rnd(batch, h, m, e) for m in kv_lens]
    values = [rnd(batch, h, m, ev) for m in kv_lens]
    return queries, keys, values


def run_with_grads(fn, tensors, grad_seed=5, **kwargs):
    """fn(queries, keys, values, **kwargs) with tensors = (queries, keys, values, *extras); return
    the outputs and the grads of every query, key, value and extra (gate/bias passed in kwargs)
    for a fixed random grad_out."""
    outs = fn(*tensors[:3], **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_outs = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
    leaves = [t for group in tensors[:3] for t in group] + list(tensors[3:])
    # an output that depends on no input (a stream with no peers) contributes no gradient
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return [o.detach() for o in outs], grads


def compare(queries, keys, values, *, extras=(), **kwargs):
    """Public API vs the SDPA route: outputs and grads of queries, keys, values and `extras`
    (the gate/bias tensors passed in kwargs, so that their gradients are compared too)."""
    def public(qs, ks, vs, **kw):
        return pa.peer_attention(qs, ks, vs, backend="reference", **kw)

    def clone(t):
        return t.detach().clone().requires_grad_(t.requires_grad)

    results = []
    for fn in (public, peer_attention_via_sdpa):
        qs, ks, vs = ([clone(t) for t in group] for group in (queries, keys, values))
        kw = dict(kwargs)
        ex = []
        for name in extras:
            kw[name] = clone(kwargs[name])
            ex.append(kw[name])
        results.append(run_with_grads(fn, (qs, ks, vs, *ex), **kw))
    (outs, grads), (want_outs, want_grads) = results
    assert len(outs) == len(want_outs)
    for i, (o, w) in enumerate(zip(outs, want_outs)):
        assert o.shape == w.shape, f"output {i}"
        assert not o.isnan().any()
        torch.testing.assert_close(o, w, atol=ATOL, rtol=0, msg=lambda m: f"output {i}: {m}")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.shape == w.shape and not g.isnan().any(), f"grad {i}"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m: f"grad {i}: {m}")
    return outs, grads


# ------------------------------------------------------------------------------------------
# one stream is SDPA
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("q_len,kv_len", [(5, 5), (3, 6), (6, 3)])
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_one_stream_is_sdpa(is_causal, q_len, kv_len, normalize):
    (q,), (k,), (v,) = make_streams([q_len], [kv_len], hq=4, h=2, ev=5)
    out = pa.peer_attention([q], [k], [v], is_causal=is_causal, enable_gqa=True, scale=0.3,
                            normalize=normalize)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True, scale=0.3)
    assert isinstance(out, list) and len(out) == 1
    torch.testing.assert_close(out[0], want, atol=ATOL, rtol=0)
    grad_out = torch.randn_like(want)
    grads = torch.autograd.grad(out[0], (q, k, v), grad_out)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# joint mode: SDPA over the concatenated keys, bias as an additive mask, gate as scaled V
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias_shape", [(2, 3, 3, 2), (3, 3, 1), (1, 1, 3, 1), (3, 1)], ids=str)
def test_joint_bias_is_an_additive_mask(bias_shape):
    # every shape varies over the peer dim p: a bias constant over p would cancel (grad 0)
    queries, keys, values = make_streams([4, 3, 5], [2, 6, 3])
    bias = torch.randn(bias_shape, dtype=F64, requires_grad=True)
    _, grads = compare(queries, keys, values, bias=bias, extras=("bias",))
    assert grads[-1].shape == bias.shape and grads[-1].abs().max() > 1e-6


def test_joint_bias_changes_the_output():
    queries, keys, values = make_streams([3, 3], [4, 4])
    bias = torch.tensor([[0.0, 2.0], [-1.0, 0.0]], dtype=F64)[None, :, :, None]
    with_bias = pa.peer_attention(queries, keys, values, bias=bias)
    without = pa.peer_attention(queries, keys, values)
    assert (with_bias[0] - without[0]).abs().max() > 1e-3


def test_joint_uniform_bias_cancels():
    queries, keys, values = make_streams([3, 4], [4, 2])
    shifted = pa.peer_attention(queries, keys, values, bias=torch.full((1,), 3.0, dtype=F64))
    plain = pa.peer_attention(queries, keys, values)
    for a, b in zip(shifted, plain):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("gate_shape", [(2, 3, 3, 2, 3), (3, 3, 1, 1), (1, 3, 1, 3), (3,)], ids=str)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_gate_joint_and_peer(gate_shape, normalize):
    queries, keys, values = make_streams([4, 3, 5], [2, 6, 3])
    gate = torch.rand(gate_shape, dtype=F64).add_(0.2).requires_grad_()
    _, grads = compare(queries, keys, values, gate=gate, normalize=normalize, extras=("gate",))
    assert grads[-1].shape == gate.shape and grads[-1].abs().max() > 1e-6


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_gate_equals_prescaled_values(normalize):
    """A gate that depends only on the peer p (and channel) is the same as scaling V_p."""
    queries, keys, values = make_streams([3, 4], [5, 2], ev=4)
    gate = torch.rand(1, 1, 2, 1, 4, dtype=F64) + 0.5
    gated = pa.peer_attention(queries, keys, values, gate=gate, normalize=normalize)
    scaled_values = [v * gate[0, 0, p, 0] for p, v in enumerate(values)]
    prescaled = pa.peer_attention(queries, keys, scaled_values, normalize=normalize)
    plain = pa.peer_attention(queries, keys, values, normalize=normalize)
    for a, b, c in zip(gated, prescaled, plain):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        assert (a - c).abs().max() > 1e-3


def test_joint_everything_together():
    queries, keys, values = make_streams([4, 0, 5], [3, 4, 0], hq=4, h=2, ev=5)
    gate = torch.rand(2, 3, 3, 4, 5, dtype=F64, requires_grad=True)
    bias = torch.randn(2, 3, 3, 4, dtype=F64, requires_grad=True)
    peers = [[True, False, True], [True, True, True], [False, True, True]]
    kv_lengths = torch.tensor([[3, 2, 0], [1, 4, 0]])
    compare(queries, keys, values, gate=gate, bias=bias, peers=peers, is_causal=True,
            kv_lengths=kv_lengths, scale=0.7, enable_gqa=True, extras=("gate", "bias"))


# ------------------------------------------------------------------------------------------
# peer mode: the gated sum of separate SDPA calls
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("is_causal", [False, True])
def test_peer_mode_is_a_sum_of_sdpa_calls(is_causal):
    queries, keys, values = make_streams([4, 3], [4, 5])
    outs = pa.peer_attention(queries, keys, values, normalize="peer", is_causal=is_causal)
    for s, q in enumerate(queries):
        want = sum(F.scaled_dot_product_attention(q, keys[p], values[p],
                                                  is_causal=is_causal and s == p)
                   for p in range(2))
        torch.testing.assert_close(outs[s], want, atol=ATOL, rtol=0)


def test_peer_mode_everything_together():
    queries, keys, values = make_streams([4, 3, 2], [3, 0, 5], hq=4, h=2, ev=5)
    gate = torch.rand(1, 3, 3, 4, 5, dtype=F64, requires_grad=True)
    peers = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    kv_lengths = torch.tensor([[3, 0, 1], [0, 0, 5]])
    compare(queries, keys, values, gate=gate, peers=peers, normalize="peer", is_causal=True,
            kv_lengths=kv_lengths, enable_gqa=True, extras=("gate",))


def test_joint_and_peer_differ():
    queries, keys, values = make_streams([3, 3], [4, 4])
    joint = pa.peer_attention(queries, keys, values)
    per_peer = pa.peer_attention(queries, keys, values, normalize="peer")
    assert (joint[0] - per_peer[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------
# absent peers, rows with nothing to attend to
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_absent_peer_is_never_read(normalize):
    """Stream 0 ignores stream 1: NaN keys/values there must not reach stream 0's output, which
    is plain SDPA over its own keys; stream 1's K/V get zero gradient from stream 0."""
    queries, keys, values = make_streams([4, 3], [5, 2])
    poisoned_k = torch.full_like(keys[1], float("nan")).requires_grad_()
    poisoned_v = torch.full_like(values[1], float("nan")).requires_grad_()
    peers = [[True, False], [True, False]]
    outs = pa.peer_attention(queries, [keys[0], poisoned_k], [values[0], poisoned_v],
                             peers=peers, normalize=normalize)
    for s in range(2):
        want = F.scaled_dot_product_attention(queries[s], keys[0], values[0])
        torch.testing.assert_close(outs[s], want, atol=ATOL, rtol=0)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (poisoned_k, poisoned_v, keys[0]),
                                allow_unused=True)
    for g in grads[:2]:
        assert g is None or (g == 0).all()
    assert grads[2].abs().max() > 0


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_stream_with_no_peers_gives_zero(normalize):
    queries, keys, values = make_streams([4, 3], [5, 2])
    gate = torch.rand(1, 2, 2, 1, 1, dtype=F64, requires_grad=True)
    outs = pa.peer_attention(queries, keys, values, peers=[[False, False], [True, True]],
                             gate=gate, normalize=normalize)
    assert (outs[0] == 0).all() and not (outs[1] == 0).all()
    loss = outs[0].square().sum() + outs[0].sum()
    grads = torch.autograd.grad(loss, [queries[0], *keys, *values, gate], allow_unused=True)
    for g in grads:
        assert g is None or ((g == 0).all() and not g.isnan().any())


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_all_keys_padded_gives_zero_without_nan(normalize):
    queries, keys, values = make_streams([3, 2], [4, 3])
    kv_lengths = torch.tensor([[0, 0], [2, 0]])
    outs = pa.peer_attention(queries, keys, values, kv_lengths=kv_lengths, normalize=normalize)
    for o in outs:
        assert (o[0] == 0).all() and not o.isnan().any()
        assert (o[1] != 0).any()
    grads = torch.autograd.grad(sum(o.sum() for o in outs), [*queries, *keys, *values])
    for g in grads:
        assert not g.isnan().any()
    assert (grads[0][0] == 0).all()  # queries[0], batch 0 saw nothing


# ------------------------------------------------------------------------------------------
# kv_lengths, causal, GQA
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_kv_lengths_equals_slicing_the_keys(normalize):
    queries, keys, values = make_streams([3, 4], [5, 6], batch=3)
    kv_lengths = torch.tensor([[5, 2], [1, 6], [3, 0]], dtype=torch.int32)
    outs = pa.peer_attention(queries, keys, values, kv_lengths=kv_lengths, normalize=normalize)
    for b in range(3):
        sliced = pa.peer_attention(
            [q[b:b + 1] for q in queries],
            [k[b:b + 1, :, :int(kv_lengths[b, p])] for p, k in enumerate(keys)],
            [v[b:b + 1, :, :int(kv_lengths[b, p])] for p, v in enumerate(values)],
            normalize=normalize)
        for o, w in zip(outs, sliced):
            torch.testing.assert_close(o[b:b + 1], w, atol=ATOL, rtol=0)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), [*keys, *values])
    for p, (gk, gv) in enumerate(zip(grads[:2], grads[2:])):
        for b in range(3):
            n = int(kv_lengths[b, p])
            assert (gk[b, :, n:] == 0).all() and (gv[b, :, n:] == 0).all()
            if n:
                assert gv[b, :, :n].abs().max() > 0


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_causal_masks_self_pairs_only(normalize):
    # stream 0 has more queries than stream 1 has keys and vice versa: a causal mask on the
    # cross pairs would hide keys; it must not.
    queries, keys, values = make_streams([5, 2], [3, 6])
    compare(queries, keys, values, is_causal=True, normalize=normalize)
    causal = pa.peer_attention(queries, keys, values, is_causal=True, normalize=normalize)
    only_cross = pa.peer_attention(queries, keys, values, is_causal=True,
                                   peers=[[False, True], [True, False]], normalize=normalize)
    plain_cross = pa.peer_attention(queries, keys, values, is_causal=False,
                                    peers=[[False, True], [True, False]], normalize=normalize)
    for a, b in zip(only_cross, plain_cross):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert (causal[0] - pa.peer_attention(queries, keys, values, normalize=normalize)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("hq,h", [(4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_gqa(hq, h, normalize):
    queries, keys, values = make_streams([3, 4], [5, 2], hq=hq, h=h)
    compare(queries, keys, values, enable_gqa=True, normalize=normalize, is_causal=True)
    # GQA equals repeating each K/V head for its group of query heads
    repeated = pa.peer_attention(queries, [k.repeat_interleave(hq // h, 1) for k in keys],
                                 [v.repeat_interleave(hq // h, 1) for v in values],
                                 normalize=normalize, is_causal=True)
    grouped = pa.peer_attention(queries, keys, values, enable_gqa=True, normalize=normalize,
                                is_causal=True)
    for a, b in zip(grouped, repeated):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_peers_as_tensor_or_lists_agree():
    queries, keys, values = make_streams([3, 4], [5, 2])
    table = [[True, False], [True, True]]
    a = pa.peer_attention(queries, keys, values, peers=table)
    b = pa.peer_attention(queries, keys, values, peers=torch.tensor(table))
    c = pa.peer_attention(queries, keys, values)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a[0] - c[0]).abs().max() > 1e-3


def test_outputs_are_separate_streams():
    queries, keys, values = make_streams([3, 0, 4], [2, 2, 2], ev=6)
    outs = pa.peer_attention(queries, keys, values)
    assert [tuple(o.shape) for o in outs] == [(2, 2, 3, 6), (2, 2, 0, 6), (2, 2, 4, 6)]
    assert all(o.dtype == F64 for o in outs)


def test_float32_accuracy():
    """SPEC section 8 on the CPU path: float32 within 1e-4 of the float64 computation."""
    torch.manual_seed(0)
    q, k, v = randn(2, 4, 9, 8), randn(2, 2, 7, 8), randn(2, 2, 7, 6)
    gate, bias = torch.rand(1, 2, 2, 4, 6, dtype=F64, requires_grad=True), randn(2, 2, 1)

    def call(fn):
        def run(q, k, v, gate, bias):
            return fn([q, q[:, :, :3]], [k, k[:, :, :2]], [v, v[:, :, :2]], gate=gate, bias=bias,
                      is_causal=True)
        return run

    assert_matches_reference(call(lambda *a, **kw: pa.peer_attention(*a, enable_gqa=True, **kw)),
                             call(peer_attention_via_sdpa), [q, k, v, gate, bias], torch.float32,
                             names=["q", "k", "v", "gate", "bias"])
