"""The eager path of the Python backends (dispatch.forward): the same kernels as the registered
ops, reached without the dispatcher, with the same numbers, gradients and autograd formulas; and
the registered op wherever something must see it (torch.compile, autocast, modes, subclasses)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peer_attention as pa
from peer_attention import dispatch, ops
from peer_attention.backends.torch_dropout import replay_torch_rng

from .test_ops import PROBLEMS

PYTHON_BACKENDS = ("reference", "torch")


def _problem(name: str, backend: str):
    problem = PROBLEMS[name]()
    if problem.dropout_seed is not None and backend == "torch":
        problem = replay_torch_rng(problem)  # as dispatch.output_and_backend does for this backend
    return problem


def _differentiable(problem):
    return [t for t in (problem.q, problem.k, problem.v, problem.gate, problem.bias,
                        problem.attn_mask, problem.sinks) if t is not None and t.requires_grad]


def _run(fn, problem, create_graph=False):
    out, lse = fn(problem)
    wanted = _differentiable(problem)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), wanted, create_graph=create_graph)
    return out, lse, grads


class _OpSpy:
    """Counts calls of a backend's registered forward op."""

    def __init__(self, monkeypatch, name):
        self.calls = 0
        fwd, bwd = dispatch._ops[name]

        def counted(*args):
            self.calls += 1
            return fwd(*args)

        monkeypatch.setitem(dispatch._ops, name, (counted, bwd))


@pytest.mark.parametrize("backend", PYTHON_BACKENDS)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_eager_path_equals_the_registered_op(name, backend, monkeypatch):
    if backend == "torch" and dispatch.BACKENDS["torch"].not_supported_reasons(PROBLEMS[name]()):
        pytest.skip("the torch backend declines this problem")
    spy = _OpSpy(monkeypatch, backend)
    problem = _problem(name, backend)
    eager = _run(lambda p: dispatch.forward(backend, p), problem)
    assert spy.calls == 0  # served without the op
    op = _run(lambda p: dispatch._ops[backend][0](*p), problem)
    assert spy.calls == 1
    for got, want in zip([eager[0], eager[1], *eager[2]], [op[0], op[1], *op[2]]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", PYTHON_BACKENDS)
def test_eager_path_records_the_ops_backward_and_double_backward(backend):
    problem = PROBLEMS["peer_gate_bias"]()
    out, _lse = dispatch.forward(backend, problem)
    assert type(out.grad_fn).__name__ == f"{backend}_eagerBackward"
    inputs = tuple(t.detach().contiguous().requires_grad_() for t in _differentiable(problem))

    def first_grads(*leaves):
        p = problem._replace(q=leaves[0], k=leaves[1], v=leaves[2], gate=leaves[3], bias=leaves[4])
        out, _ = dispatch.forward(backend, p)
        return torch.autograd.grad((out ** 2).sum(), leaves, create_graph=True)

    # second order through the eager Function: the create_graph formulas of the op's backward
    assert torch.autograd.gradcheck(lambda *x: first_grads(*x), inputs, fast_mode=True)


def test_no_gradient_wanted_calls_the_kernel_alone(monkeypatch):
    calls = []
    kernel, function = ops.eager_kernels("torch")
    monkeypatch.setitem(ops._eager, "torch", (lambda p: calls.append(p) or kernel(p), function))
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    out = pa.scaled_dot_product_attention(q, k, v, backend="torch")
    assert len(calls) == 1 and out.grad_fn is None
    with torch.no_grad():
        pa.scaled_dot_product_attention(q.requires_grad_(), k, v, backend="torch")
    assert len(calls) == 2


class _NoOpMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("context", ["autocast", "dispatch_mode", "device_context"])
def test_the_registered_op_serves_where_something_must_see_it(context, monkeypatch):
    spy = _OpSpy(monkeypatch, "torch")
    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    manager = {"autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
               "dispatch_mode": _NoOpMode, "device_context": lambda: torch.device("cpu")}[context]
    with manager():
        out = pa.scaled_dot_product_attention(q, k, v, backend="torch")
    assert spy.calls == 1
    atol = 2e-2 if context == "autocast" else 1e-6
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=0)


def test_the_registered_backward_returns_contiguous_gradients():
    """The fake kernel promises contiguous gradients (inductor checks strides); the torch
    backend's CPU kernel returns them in its (B, L, H, E) layout, which the eager path keeps."""
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    problem = PROBLEMS["sdpa"]()._replace(q=q, k=k, v=v)
    grad_out = torch.randn(2, 3, 5, 4)
    out, lse = dispatch.forward("torch", problem)
    needs = [True, True, True, False, False, False, False]
    op_grads = dispatch._ops["torch"][1](grad_out, out.detach(), lse, *problem, needs)[:3]
    assert all(g.is_contiguous() for g in op_grads)
    eager_grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip(eager_grads, op_grads):
        assert torch.equal(got, want)


def test_the_eager_path_keeps_the_kernels_layouts_and_the_op_makes_them_contiguous():
    """Issue 20: the eager path makes no copy the composition does not make (the CPU kernel's lse
    is (B, L, H) strided: saved as it is); the registered op returns what its fake kernel
    declares (contiguous out and lse), with empty tensors for the gradients nobody asked for."""
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    problem = PROBLEMS["sdpa"]()._replace(q=q, k=k, v=v)
    out, lse = dispatch.forward("torch", problem)
    assert not lse.is_contiguous()  # no copy (a (2, 3, 5) lse with strides of (2, 5, 3))
    op_out, op_lse = dispatch._ops["torch"][0](*problem)
    assert op_out.is_contiguous() and op_lse.is_contiguous()
    assert torch.equal(op_out, out) and torch.equal(op_lse, lse)
    grad_out = torch.randn(2, 3, 5, 4)
    needs = [True, False, True, False, False, False, False]
    op_grads = dispatch._ops["torch"][1](grad_out, out.detach(), lse, *problem, needs)
    assert [g.numel() == 0 for g in op_grads] == [False, True, False, True, True, True, True]
    # the backend itself returns None for them (no tensor allocated on the eager path)
    backend_grads = dispatch.BACKENDS["torch"].backward(problem, grad_out, out.detach(), lse, needs)
    assert [g is None for g in backend_grads] == [False, True, False, True, True, True, True]
    dq, dv = torch.autograd.grad(out, (q, v), grad_out)
    assert torch.equal(dq, op_grads[0]) and torch.equal(dv, op_grads[2])
