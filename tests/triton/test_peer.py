"""Multi-stream peer attention through backend="triton": forward and backward (q, k, v, gate,
bias) against the reference under SPEC section 8."""
import pytest
import torch

from tests.helpers import assert_matches_reference

from ..backends.cases import FEATURES, feature_id
from .cases import DTYPES, peer_case

SCENARIOS = {
    # all features at once: sparse peers, GQA, causal self pairs, kv_lengths, gate and bias
    "joint-everything": dict(q_lens=[5, 17, 9], kv_lens=[7, 19, 3], batch=2, q_heads=2, kv_heads=1,
                             peers=[[1, 0, 1], [1, 1, 1], [0, 1, 1]], gate_shape=(1, 3, 3, 2, 12),
                             bias_shape=(2, 3, 3, 1), kv_lengths=torch.tensor([[7, 2, 3], [0, 19, 1]]),
                             is_causal=True),
    "peer-everything": dict(q_lens=[5, 17, 9], kv_lens=[7, 19, 3], batch=2, q_heads=2, kv_heads=1,
                            peers=[[1, 0, 1], [1, 1, 1], [0, 1, 1]], gate_shape=(2, 3, 3, 2, 12),
                            kv_lengths=torch.tensor([[7, 2, 3], [0, 19, 1]]), normalize="peer",
                            is_causal=True),
    "empty-streams": dict(q_lens=[0, 6, 4], kv_lens=[5, 0, 8], gate_shape=(3, 3, 1, 12),
                          bias_shape=(3, 3, 2)),
    # a peer without keys contributes 0: the reference (whose softmax cannot reduce over 0
    # keys) is run without that pair
    "empty-streams-peer": dict(q_lens=[0, 6, 4], kv_lens=[5, 0, 8], gate_shape=(12,),
                               normalize="peer", reference_peers=[[1, 0, 1]] * 3),
    "stream-without-peers": dict(q_lens=[6, 4], kv_lens=[5, 8], peers=[[0, 0], [1, 1]],
                                 gate_shape=(2, 2, 1, 12), bias_shape=(2, 2, 1)),
    "causal-L<M-and-L>M": dict(q_lens=[21, 4], kv_lens=[6, 18], is_causal=True, bias_shape=(2, 2, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_peer_matches_reference(name, dtype):
    kernel_fn, reference_fn, inputs, names = peer_case(**SCENARIOS[name])
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)


@pytest.mark.parametrize("features", FEATURES, ids=feature_id)
def test_every_feature_combination_float32(features):
    """Two streams, odd sizes, all peers but one pair: every combination of the features."""
    f = features
    case = dict(q_lens=[5, 9], kv_lens=[7, 4], q_heads=2, kv_heads=1 if f["gqa"] else 2,
                peers=[[1, 1], [0, 1]], normalize=f["normalize"], is_causal=f["is_causal"],
                gate_shape=(1, 2, 2, 2, 12) if f["gate"] else None,
                bias_shape=(1, 2, 2, 2) if f["bias"] else None,
                kv_lengths=torch.tensor([[3, 4]]) if f["kv_lengths"] else None)
    kernel_fn, reference_fn, inputs, names = peer_case(**case)
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)


def test_gate_and_bias_in_another_dtype():
    """gate/bias may be float64 (or float32) with half-precision streams: the kernels read them
    in fp32 and return their gradients in their own dtype."""
    import peer_attention as pa

    gen = torch.Generator().manual_seed(5)
    qs = [torch.randn(1, 2, L, 16, generator=gen).half() for L in (5, 3)]
    ks = [torch.randn(1, 2, M, 16, generator=gen).half() for M in (4, 6)]
    vs = [torch.randn(1, 2, M, 8, generator=gen).half() for M in (4, 6)]
    gate = torch.rand(2, 2, 1, 8, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(2, 2, 1, generator=gen, dtype=torch.float32).requires_grad_()
    outs = pa.peer_attention(qs, ks, vs, gate=gate, bias=bias, backend="triton")
    ref = pa.peer_attention(qs, ks, vs, gate=gate.half(), bias=bias.half(), backend="reference")
    for o, r in zip(outs, ref):
        assert o.dtype == torch.float16
        assert (o.float() - r.float()).abs().max() < 2e-2
    sum(o.float().sum() for o in outs).backward()
    assert gate.grad.dtype == torch.float64 and gate.grad.shape == gate.shape
    assert bias.grad.dtype == torch.float32 and torch.isfinite(bias.grad).all()


@pytest.mark.parametrize("wanted", [("q0", "q1"), ("k0", "v1"), ("v0",), ("gate",), ("bias",)])
def test_gradient_subsets(wanted):
    """Only the gradients asked for are computed (the backward skips kernels and stores);
    each one still matches the reference."""
    kernel_fn, reference_fn, inputs, names = peer_case(
        q_lens=[5, 9], kv_lens=[7, 4], peers=[[1, 1], [0, 1]], gate_shape=(2, 2, 1, 12),
        bias_shape=(2, 2, 2), is_causal=True)
    inputs = [t.detach().requires_grad_(n in wanted) for t, n in zip(inputs, names)]
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32,
                             names=[n for n in names if n in wanted])
