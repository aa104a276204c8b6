"""Second-order gradients (create_graph=True) on every backend this machine can run.

float64 backends: torch.autograd.gradgradcheck. Others (the Triton interpreter): their
second-order gradients in float32 against the reference's in float64. Plus gradient penalties
(WGAN-GP, R1) against torch's math SDPA, and the error where a dropout mask cannot be regenerated.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

import peer_attention as pa
from peer_attention import dispatch
from peer_attention.api import sdpa_problem
from peer_attention.double_backward import differentiable_grads
from peer_attention.problem import AttentionProblem

F64 = torch.float64
RUNNABLE = [name for name, why in pa.available_backends().items() if why is None]


def rand(*shape, seed, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_(requires_grad)


def serves(backend: str, dtype) -> bool:
    return dtype in dispatch.BACKENDS[backend].capabilities.dtypes


# (id, function of (backend, *inputs), inputs in float64)
def sdpa_case(**kw):
    def fn(backend, q, k, v, *mask):
        return pa.scaled_dot_product_attention(q, k, v, *mask, backend=backend, **kw)
    return fn


def peer_case(**kw):
    def fn(backend, q0, q1, k0, k1, v0, v1, *extra):
        gate, bias = (extra + (None, None))[:2]
        outs = pa.peer_attention([q0, q1], [k0, k1], [v0, v1], gate=gate, bias=bias,
                                 backend=backend, **kw)
        return torch.cat(outs, dim=2)
    return fn


def qkv(seed=0, heads=(2, 2), lengths=(4, 5)):
    return [rand(1, heads[0], lengths[0], 3, seed=seed), rand(1, heads[1], lengths[1], 3, seed=seed + 1),
            rand(1, heads[1], lengths[1], 3, seed=seed + 2)]


def streams(seed=0):
    qs = [rand(1, 2, n, 3, seed=seed + n) for n in (3, 2)]
    ks = [rand(1, 2, n, 3, seed=seed + 10 + n) for n in (2, 3)]
    vs = [rand(1, 2, n, 3, seed=seed + 20 + n) for n in (2, 3)]
    return qs + ks + vs


CASES = [
    ("sdpa", sdpa_case(), qkv()),
    ("sdpa_causal_gqa", sdpa_case(is_causal=True, enable_gqa=True), qkv(heads=(4, 2), lengths=(5, 5))),
    ("sdpa_float_mask", sdpa_case(), qkv() + [rand(4, 5, seed=7)]),
    ("sdpa_bool_mask_scale", sdpa_case(scale=0.7),
     qkv() + [torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.3]),
    ("sdpa_causal_lower_right", sdpa_case(attn_mask=causal_lower_right(4, 5)), qkv()),
    ("peer_joint_gate_bias", peer_case(), streams() + [rand(1, 2, 2, 2, 3, seed=30),
                                                        rand(1, 2, 2, 2, seed=31)]),
    ("peer_peer_gate_causal", peer_case(normalize="peer", is_causal=True),
     streams(5) + [rand(2, 1, 3, seed=32)]),
]


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("fn,inputs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gradgradcheck_or_second_order_against_reference(backend, fn, inputs):
    if serves(backend, F64):
        assert torch.autograd.gradgradcheck(lambda *x: fn(backend, *x), inputs)
        return
    if not serves(backend, torch.float32):
        pytest.skip(f"{backend} serves neither float64 nor float32")  # pragma: no cover
    want = second_order(lambda *x: fn("reference", *x), inputs)
    low = [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t
           for t in inputs]
    try:
        got = second_order(lambda *x: fn(backend, *x), low)
    except NotImplementedError as declined:  # the backend does not serve this feature (yet)
        pytest.skip(str(declined))
    assert any(w.abs().max() > 1e-3 for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-4)


def second_order(fn, inputs):
    """Gradient of a penalty on the first-order gradients (every differentiable input)."""
    wanted = [t for t in inputs if t.requires_grad]
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(11)
    grad_out = torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)
    grads = torch.autograd.grad(out, wanted, grad_out, create_graph=True)
    penalty = sum((g * g).sum() for g in grads)
    return [g.detach() for g in torch.autograd.grad(penalty, wanted)]


@pytest.mark.parametrize("route", ["direct", "patched"])
@pytest.mark.parametrize("backend", RUNNABLE)
def test_gradient_penalties_match_torch_math(backend, route, monkeypatch):
    """WGAN-GP (|d out/d q| - 1)^2 and R1 (|d out/d q|^2) through SDPA: non-zero and torch's."""
    dtype = F64 if serves(backend, F64) else torch.float32
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv(seed=40, lengths=(5, 5)))
    weight = rand(2, 3, 3, seed=50, requires_grad=False).to(dtype)

    def penalties(sdpa):
        out = sdpa(q, k, v, is_causal=True)
        critic = (out * v.detach()[..., :3] @ weight).sum()  # a scalar "critic" of the output
        grad_q, = torch.autograd.grad(critic, q, create_graph=True)
        norm = grad_q.flatten(1).norm(dim=1)
        wgan = ((norm - 1) ** 2).mean()
        r1 = grad_q.square().sum()
        return torch.autograd.grad(wgan + 0.5 * r1, (q, k, v))

    if route == "direct":
        ours = penalties(lambda *a, **kw: pa.scaled_dot_product_attention(*a, backend=backend, **kw))
    else:  # torch's function patched, the backend chosen by use_backend
        served = []
        run = dispatch.output_and_backend
        monkeypatch.setattr(dispatch, "output_and_backend", lambda p, e=None: served.append(1) or run(p, e))
        with pa.patch_torch(), pa.use_backend(backend):
            ours = penalties(lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw))
        assert served
    with sdpa_kernel(SDPBackend.MATH):
        theirs = penalties(F.scaled_dot_product_attention)
    tol = dict(rtol=0, atol=1e-10) if dtype == F64 else dict(rtol=1e-3, atol=1e-4)
    for mine, want in zip(ours, theirs):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(mine, want, **tol)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_gradient_penalty_through_peer_attention_matches_reference_math(backend):
    dtype = F64 if serves(backend, F64) else torch.float32
    inputs = [t.detach().to(dtype).requires_grad_() for t in streams(60)]
    gate = rand(1, 2, 2, 1, 3, seed=61).detach().to(dtype).requires_grad_()
    bias = rand(2, 2, 1, seed=62).detach().to(dtype).requires_grad_()

    def penalty(fn):
        outs = fn(inputs[:2], inputs[2:4], inputs[4:], gate=gate, bias=bias)
        critic = sum(o.sin().sum() for o in outs)
        grads = torch.autograd.grad(critic, inputs[:2] + [gate], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs + [gate, bias])

    ours = penalty(lambda *a, **kw: pa.peer_attention(*a, backend=backend, **kw))
    # the oracle: the reference formulas under plain autograd (no registered op involved)
    from peer_attention.reference import peer_attention_reference
    theirs = penalty(lambda q, k, v, **kw: peer_attention_reference(q, k, v, **kw))
    tol = dict(rtol=0, atol=1e-10) if dtype == F64 else dict(rtol=1e-3, atol=1e-4)
    for mine, want in zip(ours, theirs):
        torch.testing.assert_close(mine, want, **tol)
    assert all(w.abs().max() > 1e-4 for w in theirs)


def test_sinks_gradgradcheck_on_the_reference_op():
    q, k, v = qkv(seed=70)
    sinks = rand(2, seed=71)
    op = dispatch.forward_op("reference")

    def fn(q, k, v, sinks):
        problem = sdpa_problem(q, k, v)._replace(sinks=sinks)
        return op(*problem)[0]

    assert torch.autograd.gradgradcheck(fn, (q, k, v, sinks))


def test_dropout_second_order_on_the_reference_is_exact():
    q, k, v = qkv(seed=80)

    def fn(q, k, v):
        torch.manual_seed(5)  # the same dropout mask on every call
        return pa.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend="reference")

    assert torch.autograd.gradgradcheck(fn, (q, k, v))


@pytest.mark.skipif("triton" not in RUNNABLE, reason="triton cannot run on this machine")
def test_triton_dropout_second_order_uses_the_kernels_mask():
    from peer_attention.triton_kernels import dropout_keep_mask

    q, k, v = (t.detach().float().requires_grad_() for t in qkv(seed=90))
    torch.manual_seed(6)
    problem = sdpa_problem(q, k, v, dropout_p=0.3)
    keep = dropout_keep_mask(problem)
    assert not keep.all() and keep.any()

    def ours(q, k, v):
        torch.manual_seed(6)
        return pa.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="triton")

    def math(q, k, v):
        weights = torch.softmax(q @ k.transpose(-1, -2) / 3 ** 0.5, dim=-1)
        return (weights * keep / 0.7) @ v

    got = second_order(ours, [q, k, v])
    want = second_order(math, [q, k, v])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_dropout_without_a_regenerable_mask_raises_not_zero():
    q, k, v = qkv(seed=95)
    torch.manual_seed(0)
    problem = sdpa_problem(q, k, v, dropout_p=0.5)
    with pytest.raises(RuntimeError, match="double backward.*dropout.*'cuda'"):
        differentiable_grads("cuda", problem, torch.ones(1, 2, 4, 3, dtype=F64),
                             [problem.q, problem.k, problem.v] + [None] * 4,
                             [True, True, True] + [False] * 4)


def test_first_order_backward_still_runs_the_backend_kernel(monkeypatch):
    """Without create_graph the registered backward op serves the gradient (no recomputation)."""
    import peer_attention.double_backward as double_backward

    def fail(*args, **kwargs):
        raise AssertionError("recomputed without create_graph")

    monkeypatch.setattr(double_backward, "recompute_output", fail)
    q, k, v = qkv(seed=99)
    pa.scaled_dot_product_attention(q, k, v, backend="reference").sum().backward()
    assert q.grad is not None and q.grad.abs().max() > 0
