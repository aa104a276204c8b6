"""The `torch` backend on the caller's own streams (backends/torch_streams.py, issue 20): which
calls take it, the same numbers and gradients as the packed route and the reference (second order
included), zero-size streams, and the calls it leaves to the op path. No timing here: bench
--preset cpu measures it against the compositions."""
import contextlib

import pytest
import torch

import peer_attention as pa
from peer_attention import dispatch
from peer_attention.backends import torch_streams
from peer_attention.backends.torch_fused import PAIRS, forced_plan
from peer_attention.reference import peer_attention_reference
from tests.helpers import assert_matches_reference

from .cases import FEATURES, feature_id, peer_case


@pytest.fixture
def served(monkeypatch):
    """A list that gets one entry per call the stream route serves."""
    calls = []
    original = torch_streams.stream_outputs

    def spy(*args):
        calls.append(args[0].normalize)
        return original(*args)

    monkeypatch.setattr(torch_streams, "stream_outputs", spy)
    return calls


def _streams(lens, heads=2, dim=8, dtype=torch.float32, requires_grad=True):
    return [torch.randn(1, heads, n, dim, dtype=dtype, requires_grad=requires_grad) for n in lens]


def _call(lens=(5, 9), backend=None, dtype=torch.float32, **kw):
    qs, ks, vs = _streams(lens, dtype=dtype), _streams(lens, dtype=dtype), _streams(lens, dtype=dtype)
    return pa.peer_attention(qs, ks, vs, backend=backend, **kw)


def test_which_calls_take_the_stream_route(served):
    s = 2
    gate = torch.rand(1, s, s, 2, 8, requires_grad=True)
    bias = torch.randn(1, s, s, 2)
    for kw in (dict(), dict(gate=gate), dict(gate=gate, bias=bias), dict(normalize="peer"),
               dict(normalize="peer", gate=gate, is_causal=True),
               dict(kv_lengths=torch.tensor([[3, 4]])), dict(is_causal=True),
               dict(peers=[[1, 1], [0, 1]])):
        served.clear()
        _call(**kw)
        assert served, kw
    served.clear()
    _call(backend="torch")
    assert served
    served.clear()  # a module's parameters as gate and bias are plain tensors
    _call(gate=torch.nn.Parameter(gate.detach()), bias=torch.nn.Parameter(bias, requires_grad=False))
    assert served
    # left to the op path: a bias gradient, forced pairs, long causal streams, 16-bit gates,
    # variants, an explicit other backend, one stream, a stream that takes part in nothing
    cases = [dict(bias=bias.clone().requires_grad_()), dict(backend="reference"),
             dict(lens=(200, 9), is_causal=True), dict(softcap=5.0),
             dict(window=(2, 0)), dict(lens=(5,)), dict(peers=[[1, 0], [1, 0]]),
             dict(dtype=torch.bfloat16, gate=gate.to(torch.bfloat16))]
    for kw in cases:
        served.clear()
        _call(**kw)
        assert not served, kw
    with forced_plan(PAIRS):
        _call()
    with dispatch.packed_streams():
        _call()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _call()
    assert not served
    # a tensor subclass sees the op path too
    class Sub(torch.Tensor):
        pass
    qs = [t.as_subclass(Sub) for t in _streams((5, 9))]
    pa.peer_attention(qs, _streams((5, 9)), _streams((5, 9)))
    assert not served


ROUTES = {"streams": contextlib.nullcontext, "packed": dispatch.packed_streams}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("features", FEATURES, ids=feature_id)
def test_every_feature_on_three_streams_float64(features, route):
    """Every feature combination (bias without gradient: the stream route's case) on three
    streams with a sparse table, a zero-length query stream and GQA: float64 outputs and
    gradients to 1e-12 through either route."""
    f = features
    case = dict(q_lens=[5, 9, 0], kv_lens=[7, 4, 3], q_heads=2, kv_heads=1 if f["gqa"] else 2,
                peers=[[1, 1, 0], [1, 1, 1], [0, 1, 1]], normalize=f["normalize"],
                is_causal=f["is_causal"], gate_shape=(1, 3, 3, 2, 12) if f["gate"] else None,
                bias_shape=(1, 3, 3, 2) if f["bias"] else None,
                kv_lengths=torch.tensor([[3, 4, 0]]) if f["kv_lengths"] else None)
    kernel_fn, reference_fn, inputs, names = peer_case("torch", **case)
    if f["bias"]:
        inputs[-1] = inputs[-1].detach()
        names = names[:-1]
    with ROUTES[route]():
        assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float64, names=names,
                                 float32_atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_float32_and_bfloat16_within_spec(normalize, dtype, served):
    """SPEC section 8 bounds; a bfloat16 gate in peer mode is summed in float32, rounded once."""
    gate = (1, 2, 2, 2, 12) if (normalize == "peer" or dtype == torch.float32) else None
    kernel_fn, reference_fn, inputs, names = peer_case(
        "torch", q_lens=[6, 11], kv_lens=[9, 5], gate_shape=gate, normalize=normalize,
        is_causal=True)
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)
    assert served


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_second_order_gradients_match_the_reference(normalize, served):
    """A gradient penalty through the stream route: each kernel call's create_graph backward
    is the reference formulas, so the second-order gradients are exact (float64)."""
    gen = torch.Generator().manual_seed(3)

    def streams(lens):
        return [torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
                for n in lens]
    qs, ks, vs = streams((4, 6)), streams((5, 3)), streams((5, 3))
    gate = torch.rand(1, 2, 2, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = qs + ks + vs + [gate]

    def penalty(fn, **kw):
        outs = fn(qs, ks, vs, gate=gate, normalize=normalize, is_causal=True, **kw)
        grads = torch.autograd.grad(sum((o * o).sum() for o in outs), inputs, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), inputs)

    got = penalty(pa.peer_attention)
    assert served
    want = penalty(peer_attention_reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_zero_size_streams_get_empty_gradients(served):
    """Wan's layout: every stream requires grad; the empty ones get empty gradients and empty
    outputs of the graph (a gradient may be given for each), as through the op."""
    qs, ks, vs = _streams((6, 0, 0)), _streams((0, 7, 5)), _streams((0, 7, 5))
    outs = pa.peer_attention(qs, ks, vs, peers=[[0, 1, 1], [0, 0, 0], [0, 0, 0]],
                             normalize="peer")
    assert served
    assert [tuple(o.shape) for o in outs] == [(1, 2, 6, 8), (1, 2, 0, 8), (1, 2, 0, 8)]
    grads = torch.autograd.grad(outs, qs + ks + vs, [torch.ones_like(o) for o in outs])
    for t, g in zip(qs + ks + vs, grads):
        assert g.shape == t.shape


def test_no_grad_and_inference_mode_and_the_callers_tensors(served):
    qs, ks, vs = _streams((5, 9)), _streams((5, 9)), _streams((5, 9))
    gate = torch.rand(1, 2, 2, 2, 8)
    before = [t.clone() for t in qs + ks + vs]
    want = pa.peer_attention(qs, ks, vs, gate=gate)
    with torch.no_grad():
        no_grad = pa.peer_attention(qs, ks, vs, gate=gate)
    with torch.inference_mode():
        inference = pa.peer_attention(qs, ks, vs, gate=gate)
    after = pa.peer_attention(qs, ks, vs, gate=gate)  # placeholders made in inference_mode serve
    assert len(served) == 4
    for a, b, c, d in zip(want, no_grad, inference, after):
        torch.testing.assert_close(b, a.detach(), atol=0, rtol=0)
        torch.testing.assert_close(c, a.detach(), atol=0, rtol=0)
        torch.testing.assert_close(d, a, atol=0, rtol=0)
    for t, b in zip(qs + ks + vs, before):
        assert torch.equal(t, b)


def test_outputs_are_the_kernels_own(served):
    """A per-stream call returns its kernel's output (no packed output split again)."""
    gate = torch.rand(1, 2, 2, 2, 8, requires_grad=True)
    outs = _call(gate=gate)
    assert served == ["joint"]
    assert all(type(o.grad_fn).__name__ == "KernelCallsBackward" for o in outs)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_backend_torch_on_the_callers_streams(dtype, route):
    """backend='torch' on CUDA (torch's efficient-attention kernel), both routes: a joint gate
    (float32 only: a 16-bit gate takes the pair plan), the per-peer softmax with kv_lengths
    padding, GQA and a causal self pair."""
    cases = [dict(q_lens=[6, 11], kv_lens=[9, 5], gate_shape=(1, 2, 2, 2, 12)),
             dict(q_lens=[6, 11, 3], kv_lens=[9, 5, 7], q_heads=4, kv_heads=2, normalize="peer",
                  is_causal=True, gate_shape=(1, 3, 3, 4, 12),
                  kv_lengths=torch.tensor([[9, 2, 7]], device="cuda"))]
    for case in cases:
        kernel_fn, reference_fn, inputs, names = peer_case("torch", **case)
        inputs = [t.detach().cuda().requires_grad_() for t in inputs]
        with ROUTES[route]():
            assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)
