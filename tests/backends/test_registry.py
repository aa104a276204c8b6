"""The backend registry and the policies a backend owns (backends/registry.py, base.py hooks):
what double backward and context parallelism ask a backend, and what a backend that declares
nothing gets (a refusal naming the backends that can, never a wrong result)."""
import pytest
import torch

import peer_attention as pa
from peer_attention import dispatch
from peer_attention.api import sdpa_problem
from peer_attention.backends import registry
from peer_attention.backends.base import (ANY, JOINT_ONLY, JOINT_WITHOUT_GATE_BIAS_GRADS,
                                          Backend)
from peer_attention.double_backward import differentiable_grads


def test_registry_is_the_one_list_of_backends():
    assert registry.names() == dispatch.SPEED_ORDER == tuple(pa.available_backends())
    assert all(dispatch.BACKENDS[name].name == name for name in registry.names())
    assert registry.names()[-1] == registry.ORACLE == "reference"


def test_builtin_backends_declare_their_policies():
    declared = {name: dispatch.BACKENDS[name].merged_statistics for name in registry.names()}
    assert declared == {"reference": ANY, "torch": JOINT_ONLY,
                        "triton": JOINT_WITHOUT_GATE_BIAS_GRADS,
                        "cuda": JOINT_WITHOUT_GATE_BIAS_GRADS}


def _dropout_problem():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    return sdpa_problem(q, k, v, dropout_p=0.3), (q, k, v)


def test_default_policies_refuse_rather_than_guess():
    problem, _ = _dropout_problem()
    plain = Backend()
    assert plain.prepare(problem) is problem
    assert plain.dropout_keep_mask(problem) is None and plain.merged_statistics is None
    assert dispatch.BACKENDS["reference"].prepare(problem) is problem


def test_double_backward_asks_the_backend_for_its_keep_mask():
    problem, (q, k, v) = _dropout_problem()
    inputs = [q.requires_grad_(), k, v, None, None, None, None]
    needs = [True] + [False] * 6
    grad_out = torch.ones(1, 2, 4, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'cuda'.*backend='triton' or 'torch' or 'reference'"):
        differentiable_grads("cuda", problem, grad_out, inputs, needs)
    dq = differentiable_grads("reference", problem, grad_out, inputs, needs)[0]
    keep = dispatch.BACKENDS["reference"].dropout_keep_mask(problem)
    assert keep.shape == (1, 2, 4, 4) and keep.dtype == torch.bool
    assert dq.shape == q.shape and dq.requires_grad  # differentiable: a second order exists
