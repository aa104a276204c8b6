"""torch.func transforms (grad, jacrev, vmap) and torch.jit.trace.

Under patch_torch() such calls are handed to torch's own function (the registered ops have no
functorch rules); direct calls of pa.scaled_dot_product_attention compute the reference formulas
as plain PyTorch ops, or raise a clear error (an explicit kernel backend, dropout)."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import peer_attention as pa
from tests.helpers import recorded_dispatch

ORIGINAL = F.scaled_dot_product_attention
F64 = torch.float64


def qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 4, generator=gen, dtype=F64) for n in (5, 6, 6)]


def ours_direct(*args, **kwargs):
    return pa.scaled_dot_product_attention(*args, **kwargs)


def ours_patched(*args, **kwargs):
    return F.scaled_dot_product_attention(*args, **kwargs)  # the patched attribute, looked up now


def math(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return ORIGINAL(*args, **kwargs)


@pytest.fixture(params=["direct", "patched"])
def sdpa(request):
    patch = pa.patch_torch() if request.param == "patched" else contextlib.nullcontext()
    with recorded_dispatch("output_and_backend") as calls, patch:
        yield ours_direct if request.param == "direct" else ours_patched
    # neither path reaches a registered op while a transform is active
    assert calls == []


def test_grad(sdpa):
    q, k, v = qkv()
    loss = lambda fn: lambda q: fn(q, k, v, is_causal=True).square().sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(sdpa))(q), torch.func.grad(loss(math))(q))


def test_jacrev_with_a_float_mask(sdpa):
    q, k, v = qkv(1)
    mask = torch.randn(5, 6, dtype=F64)
    fn = lambda sd: lambda k: sd(q[:1, :1], k, v[:1, :1], attn_mask=mask)  # noqa: E731
    k = k[:1, :1]
    torch.testing.assert_close(torch.func.jacrev(fn(sdpa))(k), torch.func.jacrev(fn(math))(k))


def test_vmap_over_an_extra_batch_dim(sdpa):
    q, k, v = qkv(2)
    fn = lambda sd: lambda q, k, v: sd(q, k, v, scale=0.3)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(fn(sdpa))(q, k, v), math(q, k, v, scale=0.3))


def test_hessian_vector_product_via_jvp_of_grad():
    """Forward-mode AD too (torch's fused CPU kernel has none; under the patch torch decides)."""
    q, k, v = qkv(3)
    loss = lambda fn: lambda q: fn(q, k, v).sin().sum()  # noqa: E731
    tangent = torch.ones_like(q)
    _, ours = torch.func.jvp(torch.func.grad(loss(ours_direct)), (q,), (tangent,))
    _, want = torch.func.jvp(torch.func.grad(loss(math)), (q,), (tangent,))
    torch.testing.assert_close(ours, want)


def test_jit_trace(sdpa):
    q, k, v = qkv(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants
        traced = torch.jit.trace(lambda q, k, v: sdpa(q, k, v, is_causal=True), (q, k, v),
                                 check_trace=False)  # the check would rerun it untraced
    q2, k2, v2 = qkv(5)
    torch.testing.assert_close(traced(q2, k2, v2), math(q2, k2, v2, is_causal=True))


def test_direct_call_with_a_kernel_backend_under_a_transform_raises_clearly():
    q, k, v = qkv(6)
    fn = lambda q: pa.scaled_dot_product_attention(q, k, v, backend="triton").sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run under a torch.func"):
        torch.func.grad(fn)(q)


def test_direct_call_with_dropout_under_a_transform_raises_clearly():
    q, k, v = qkv(7)
    fn = lambda q: pa.scaled_dot_product_attention(q, k, v, dropout_p=0.5).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="dropout is not supported under a torch.func"):
        torch.func.grad(fn)(q)


def test_patched_dropout_under_vmap_is_torch_s_own():
    q, k, v = qkv(8)
    with pa.patch_torch():
        torch.manual_seed(0)
        got = torch.func.vmap(lambda q: F.scaled_dot_product_attention(q, k[0], v[0], dropout_p=0.5),
                              randomness="same")(q)
    torch.manual_seed(0)
    want = torch.func.vmap(lambda q: ORIGINAL(q, k[0], v[0], dropout_p=0.5), randomness="same")(q)
    torch.testing.assert_close(got, want)


def test_peer_attention_under_grad_and_vmap():
    """Direct peer attention calls under transforms: the reference formulas, as for SDPA."""
    from peer_attention.reference import peer_attention_reference

    gen = torch.Generator().manual_seed(9)
    qs = [torch.randn(2, 2, n, 4, generator=gen, dtype=F64) for n in (3, 2)]
    gate = torch.randn(2, 2, 1, 4, generator=gen, dtype=F64)

    def loss(fn):
        return lambda g: sum(o.square().sum() for o in fn(qs, qs, qs, gate=g, is_causal=True))

    torch.testing.assert_close(torch.func.grad(loss(pa.peer_attention))(gate),
                               torch.func.grad(loss(peer_attention_reference))(gate))
    batched = torch.func.vmap(lambda q: pa.peer_attention([q, qs[1]], [q, qs[1]], [q, qs[1]])[0])
    stacked = torch.stack([qs[0], qs[0] * 2])
    want = [pa.peer_attention([q, qs[1]], [q, qs[1]], [q, qs[1]])[0] for q in stacked]
    torch.testing.assert_close(batched(stacked), torch.stack(want))
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run under a torch.func"):
        torch.func.grad(lambda g: pa.peer_attention(qs, qs, qs, gate=g, backend="triton")[0].sum())(gate)
