"""The registered op peer_attention::triton_fwd passes torch.library.opcheck (schema, fake
implementation, autograd registration, AOT dispatch)."""
import pytest
import torch

from peer_attention import dispatch
from peer_attention.api import peer_problem, sdpa_problem
from peer_attention.problem import AttentionProblem


def _streams(gen, q_lens, kv_lens, heads=2, kv_heads=2, e=20, ev=12):
    qs = [torch.randn(1, heads, n, e, generator=gen).requires_grad_() for n in q_lens]
    ks = [torch.randn(1, kv_heads, n, e, generator=gen).requires_grad_() for n in kv_lens]
    vs = [torch.randn(1, kv_heads, n, ev, generator=gen).requires_grad_() for n in kv_lens]
    return qs, ks, vs


def _problems():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (t[0] for t in _streams(gen, [5], [7]))
    mask = torch.randn(1, 1, 5, 7, generator=gen).requires_grad_()
    yield "sdpa-float-mask", sdpa_problem(q, k, v, attn_mask=mask)
    qs, ks, vs = _streams(gen, [5, 3], [4, 6], heads=2, kv_heads=1)
    gate = torch.rand(2, 2, 1, 12, generator=gen).requires_grad_()
    bias = torch.randn(2, 2, 1, generator=gen).requires_grad_()
    yield "peer-joint-gate-bias-gqa", peer_problem(qs, ks, vs, gate=gate, bias=bias, is_causal=True,
                                                   peers=[[1, 1], [0, 1]], enable_gqa=True)
    yield "peer-peer-mode", peer_problem(qs, ks, vs, gate=gate, normalize="peer", enable_gqa=True)
    # the SPEC section 9 variants on a varlen (diagonal peer table) problem, sinks with a gradient
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).requires_grad_() for n in (12, 14, 14))
    sinks = torch.randn(2, generator=gen).requires_grad_()
    yield "varlen-variants", AttentionProblem(
        q, k, v, (5, 7), (6, 8), (), None, None, None, None, None, 0.0, True, 0.25, "joint",
        3, -1, True, 4.0, torch.rand(1, 2), sinks)


@pytest.mark.parametrize("problem", [pytest.param(p, id=name) for name, p in _problems()])
def test_opcheck_triton_fwd(problem):
    torch.library.opcheck(dispatch.forward_op("triton"), problem.op_args())
