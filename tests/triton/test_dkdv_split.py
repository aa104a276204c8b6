"""The dK/dV kernel split into a dV launch and a dK launch (configs.split_dkdv: sm_100 above head
dim 128 in 16-bit, where one kernel's dK and dV take all of tcgen05's tensor memory) computes
what the single launch does, bit for bit: each part runs the same code for its gradient, and
writes only its own output. Forced on under the interpreter (which never splits)."""
import pytest
import torch

from peer_attention.problem import AttentionProblem
from peer_attention.triton_kernels import bwd, configs, fwd

pytestmark = pytest.mark.skipif(not configs.INTERPRET, reason="forces the split on the interpreter")


def _problem(normalize, dropout):
    """Three streams with unequal lengths, GQA, gates, biases, a float mask and causal masking:
    every stage and flag of the dK/dV loop."""
    torch.manual_seed(0)
    q_lens, kv_lens, n = (40, 24, 9), (33, 24, 17), 3
    q = torch.randn(1, 4, sum(q_lens), 16)
    k = torch.randn(1, 2, sum(kv_lens), 16)
    v = torch.randn(1, 2, sum(kv_lens), 16)
    gate = torch.rand(1, n, n, 4, 16) + 0.5
    bias = torch.randn(1, n, n, 4)
    mask = torch.randn(1, 4, sum(q_lens), sum(kv_lens))
    seed = torch.tensor([1, 2]) if dropout else None
    return AttentionProblem(q, k, v, q_lens, kv_lens, (1, 1, 0, 0, 1, 1, 1, 0, 1), gate, bias,
                            None, mask, seed, dropout, True, 16 ** -0.5, normalize)


@pytest.mark.parametrize("normalize,dropout", [("joint", 0.0), ("peer", 0.0), ("joint", 0.25)])
def test_split_dkdv_matches_one_launch(normalize, dropout, monkeypatch):
    problem = _problem(normalize, dropout)
    out, lse = fwd.forward(problem)
    grad_out = torch.randn_like(out)
    needs = (True,) * 6
    whole = bwd.backward(problem, grad_out, out, lse, needs)
    launches = []
    real = bwd.backward_launches

    def spy(*args, **kwargs):
        launches.append(real(*args, **kwargs))
        return launches[-1]
    monkeypatch.setattr(bwd, "split_dkdv", lambda *args: True)
    monkeypatch.setattr(bwd, "backward_launches", spy)
    split = bwd.backward(problem, grad_out, out, lse, needs)
    parts = [kw["PARTS"] for name, _, _, kw, _ in launches[0] if name == "dkdv"]
    assert parts == [bwd.DV_PART, bwd.DK_PART]
    for name, a, b in zip(("dq", "dk", "dv", "dgate", "dbias", "dmask"), whole, split):
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item():.3g}"
    assert whole[1].abs().sum() > 0 and whole[2].abs().sum() > 0
