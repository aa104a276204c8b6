"""The dK/dV kernel's two-sweep configs (PHASES=2: dV over every query tile, stored, then dK; the
sm_90 candidates that keep 32-64-query wgmma tiles spill-free at head dim 128) compute the same
gradients as one sweep, bit for bit: the same products in the same order per accumulator, only
split in two passes. One sweep is checked against the reference by the rest of the suite; this
runs every feature family through both, at the interpreter's tiles and at a larger one."""
import pytest
import torch

from peer_attention.problem import AttentionProblem
from peer_attention.triton_kernels import backward, bwd, configs, forward

pytestmark = pytest.mark.skipif(not configs.INTERPRET, reason="PHASES is set on the launch "
                                "(the interpreter does not autotune)")

ONE = dict(q_lens=(40,), kv_lens=(37,), peers=(1,))
THREE = dict(q_lens=(40, 24, 9), kv_lens=(33, 24, 17), peers=(1, 1, 0, 0, 1, 1, 1, 0, 1))
FAMILIES = {
    "plain": dict(ONE),
    "causal": dict(ONE, causal=True),
    "gate_bias": dict(THREE, gate=True, bias=True),
    "float_mask": dict(ONE, mask=True),
    "peer": dict(THREE, gate=True, normalize="peer", causal=True),
    "variants": dict(ONE, window=(12, 0), bottom_right=True, softcap=30.0, alibi=True,
                     sinks=True, kv_lengths=True),
    "dropout_gqa": dict(ONE, heads=(4, 2), dropout=0.25, mask=True),
}


def _problem(q_lens, kv_lens, peers, heads=(2, 2), e=16, ev=12, gate=False, bias=False,
             kv_lengths=False, mask=False, dropout=0.0, causal=False, normalize="joint",
             window=(-1, -1), bottom_right=False, softcap=0.0, alibi=False, sinks=False):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    n, tq, tk = len(q_lens), sum(q_lens), sum(kv_lens)
    return AttentionProblem(
        randn(1, heads[0], tq, e), randn(1, heads[1], tk, e), randn(1, heads[1], tk, ev),
        tuple(q_lens), tuple(kv_lens), peers,
        randn(1, n, n, heads[0], ev).abs() + 0.5 if gate else None,
        randn(1, n, n, heads[0]) if bias else None,
        torch.tensor([[kv_lens[0] - 5] + list(kv_lens[1:])]) if kv_lengths else None,
        randn(1, heads[0], tq, tk) if mask else None,
        torch.tensor([3, 4]) if dropout else None, dropout, causal, e ** -0.5, normalize,
        window[0], window[1], bottom_right, softcap,
        randn(1, heads[0]).abs() * 0.1 if alibi else None,
        randn(heads[0]) if sinks else None)


def _grads(problem, grad_out, monkeypatch, dkdv_meta):
    """The backward's seven gradients with `dkdv_meta` added to the dK/dV launch's arguments."""
    launches = bwd.backward_launches

    def with_meta(*args, **kwargs):
        result = launches(*args, **kwargs)
        return [(name, fn, a, dict(kw, **dkdv_meta) if name == "dkdv" else kw, grid)
                for name, fn, a, kw, grid in result]
    monkeypatch.setattr(bwd, "backward_launches", with_meta)
    out, lse = forward(problem)
    grads = backward(problem, grad_out, out, lse, (True,) * 7)
    monkeypatch.setattr(bwd, "backward_launches", launches)
    return grads


@pytest.mark.parametrize("blocks", [(16, 16), (32, 64)], ids=["16x16", "32x64"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_sweeps_equal_one(family, blocks, monkeypatch):
    problem = _problem(**FAMILIES[family])
    grad_out = torch.randn(problem.q.shape[:3] + (problem.value_dim,),
                           generator=torch.Generator().manual_seed(1))
    tiles = dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1])
    one = _grads(problem, grad_out, monkeypatch, tiles)
    two = _grads(problem, grad_out, monkeypatch, dict(tiles, PHASES=2))
    for name, a, b in zip(("dq", "dk", "dv", "dgate", "dbias", "dmask", "dsinks"), one, two):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item():.3g}"
    assert one[1].abs().max() > 0 and one[2].abs().max() > 0
