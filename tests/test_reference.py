"""The reference semantics of scaled_dot_product_attention against torch's own, in float64.

Both routes are checked against torch.nn.functional.scaled_dot_product_attention: the public
API (backend="reference") and the oracle function `reference.sdpa_reference` directly.
Dropout is checked through the public API only (torch's dropout mask cannot be reproduced).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import peer_attention as pa
from peer_attention.reference import sdpa_reference
from tests.helpers import assert_matches_reference, randn

F64 = torch.float64
ATOL = 1e-10


def public_sdpa(*args, **kwargs):
    return pa.scaled_dot_product_attention(*args, backend="reference", **kwargs)


ROUTES = {"public_api": public_sdpa, "sdpa_reference": sdpa_reference}


def make_qkv(lead, hq, h, seq_q, seq_k, e, ev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, hq, seq_q, e, dtype=F64, generator=gen).requires_grad_()
    k = torch.randn(*lead, h, seq_k, e, dtype=F64, generator=gen).requires_grad_()
    v = torch.randn(*lead, h, seq_k, ev, dtype=F64, generator=gen).requires_grad_()
    return q, k, v


def outputs_and_grads(fn, tensors, kwargs, grad_out=None):
    """fn(*tensors, **kwargs) and the gradients of every tensor (incl. a mask in kwargs) that
    requires grad, for a fixed random grad_out."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    kwargs = dict(kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.requires_grad:
        kwargs["attn_mask"] = mask.detach().clone().requires_grad_()
        leaves_with_mask = leaves + [kwargs["attn_mask"]]
    else:
        leaves_with_mask = leaves
    out = fn(*leaves, **kwargs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    wanted = [t for t in leaves_with_mask if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if out.numel() else (
        [None] * len(wanted))
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)]
    return out.detach(), grads


def assert_matches_torch(fn, q, k, v, **kwargs):
    out, grads = outputs_and_grads(fn, (q, k, v), kwargs)
    want, want_grads = outputs_and_grads(F.scaled_dot_product_attention, (q, k, v), kwargs)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    assert len(grads) == len(want_grads)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert not torch.isnan(g).any(), f"grad {i} has NaN"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m: f"grad {i}: {m}")


@pytest.fixture(params=list(ROUTES), ids=list(ROUTES))
def sdpa(request):
    return ROUTES[request.param]


# ------------------------------------------------------------------------------------------
# plain, causal, scale, GQA, shapes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_q,seq_k", [(5, 5), (3, 7), (7, 3), (1, 1), (1, 9), (9, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch_causal_and_lengths(sdpa, seq_q, seq_k, is_causal):
    q, k, v = make_qkv((2,), 3, 3, seq_q, seq_k, 8, 8)
    assert_matches_torch(sdpa, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.7])
def test_custom_scale(sdpa, scale):
    q, k, v = make_qkv((2,), 2, 2, 4, 6, 5, 5)
    assert_matches_torch(sdpa, q, k, v, scale=scale)


def test_custom_scale_changes_the_result():
    q, k, v = make_qkv((1,), 1, 1, 4, 6, 5, 5)
    a = public_sdpa(q, k, v, scale=0.1)
    b = public_sdpa(q, k, v)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("hq,h", [(4, 2), (6, 3), (4, 1), (3, 3)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(sdpa, hq, h, is_causal):
    q, k, v = make_qkv((2,), hq, h, 5, 6, 4, 3)
    assert_matches_torch(sdpa, q, k, v, is_causal=is_causal, enable_gqa=True)


@pytest.mark.parametrize("e,ev", [(3, 7), (8, 2), (1, 1), (5, 13)])
def test_head_dims_differ(sdpa, e, ev):
    q, k, v = make_qkv((2,), 2, 2, 5, 4, e, ev)
    assert_matches_torch(sdpa, q, k, v)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3), (1, 2, 2)], ids=["3d", "4d", "5d", "6d"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_leading_dims(sdpa, lead, is_causal):
    q, k, v = make_qkv(lead, 2, 2, 5, 3, 4, 6)
    assert_matches_torch(sdpa, q, k, v, is_causal=is_causal)


def test_leading_dims_with_gqa_and_mask(sdpa):
    q, k, v = make_qkv((2, 3), 4, 2, 5, 3, 4, 6)
    mask = torch.rand(3, 1, 5, 3, generator=torch.Generator().manual_seed(1)) > 0.3
    assert_matches_torch(sdpa, q, k, v, attn_mask=mask, enable_gqa=True)


def test_odd_sizes(sdpa):
    q, k, v = make_qkv((3,), 5, 5, 17, 13, 11, 7)
    assert_matches_torch(sdpa, q, k, v)
    assert_matches_torch(sdpa, q, k, v, is_causal=True)


def test_non_contiguous_inputs(sdpa):
    q, k, v = make_qkv((2,), 3, 3, 5, 6, 4, 4)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not qt.is_contiguous()
    assert_matches_torch(sdpa, qt, k, v[..., ::1], is_causal=True)


# ------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------

MASK_SHAPES = [(5, 6), (1, 6), (5, 1), (3, 5, 6), (1, 1, 6), (2, 1, 5, 6), (2, 3, 5, 6), (1, 1, 1, 1)]


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
def test_bool_mask_broadcast(sdpa, mask_shape):
    q, k, v = make_qkv((2,), 3, 3, 5, 6, 4, 4)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(3)) > 0.4
    mask.view(-1)[0] = True  # not every row fully masked
    assert_matches_torch(sdpa, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("mask_grad", [False, True])
def test_float_mask_broadcast_and_grad(sdpa, mask_shape, mask_grad):
    q, k, v = make_qkv((2,), 3, 3, 5, 6, 4, 4)
    mask = torch.randn(mask_shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    assert_matches_torch(sdpa, q, k, v, attn_mask=mask.requires_grad_(mask_grad))


def test_float_mask_grad_is_the_score_gradient():
    """d out / d mask equals d out / d scores: check against an explicit softmax computation."""
    q, k, v = make_qkv((1,), 2, 2, 4, 5, 3, 3)
    mask = torch.randn(1, 2, 4, 5, dtype=F64, requires_grad=True)
    pa.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    mask2 = mask.detach().clone().requires_grad_()
    scores = q.detach() @ k.detach().transpose(-1, -2) / math.sqrt(3) + mask2
    (torch.softmax(scores, -1) @ v.detach()).sum().backward()
    torch.testing.assert_close(mask.grad, mask2.grad, atol=ATOL, rtol=0)
    assert mask.grad.abs().max() > 1e-3


def test_float_mask_with_minus_inf(sdpa):
    q, k, v = make_qkv((2,), 2, 2, 4, 5, 3, 3)
    mask = torch.zeros(4, 5, dtype=F64)
    mask[:, 1] = float("-inf")
    mask[2, 3] = float("-inf")
    assert_matches_torch(sdpa, q, k, v, attn_mask=mask)


# ------------------------------------------------------------------------------------------
# empty sequences, fully masked rows
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_q,seq_k", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_sequences(sdpa, seq_q, seq_k, is_causal):
    q, k, v = make_qkv((2,), 2, 2, seq_q, seq_k, 4, 3)
    out = sdpa(q, k, v, is_causal=is_causal)
    assert out.shape == (2, 2, seq_q, 3)
    assert not out.isnan().any() and (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is None or ((t.grad == 0).all() and t.grad.shape == t.shape)


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_batch(sdpa, lead):
    q, k, v = make_qkv(lead, 2, 2, 3, 4, 4, 5)
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = sdpa(q, k, v, attn_mask=mask)
    assert out.shape == (*lead, 2, 3, 5)
    out.sum().backward()
    assert q.grad is None or q.grad.shape == q.shape


def assert_fully_masked_rows_are_zero(sdpa, mask, masked_row):
    q, k, v = make_qkv((2,), 2, 2, 4, 5, 3, 3)
    out = sdpa(q, k, v, attn_mask=mask)
    assert not out.isnan().any()
    assert (out[..., masked_row, :] == 0).all()
    assert (out[..., masked_row + 1, :] != 0).any()
    grad_out = torch.zeros_like(out)
    grad_out[..., masked_row, :] = 1.0  # only the masked row is differentiated
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    for g in (dq, dk, dv):
        assert not g.isnan().any() and (g == 0).all()
    # and the whole computation still matches torch (torch also gives 0 there)
    assert_matches_torch(sdpa, q, k, v, attn_mask=mask)


def test_fully_masked_row_bool(sdpa):
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False
    assert_fully_masked_rows_are_zero(sdpa, mask, 1)


def test_fully_masked_row_float(sdpa):
    mask = torch.zeros(4, 5, dtype=F64)
    mask[2] = float("-inf")
    assert_fully_masked_rows_are_zero(sdpa, mask, 2)


def test_causal_with_more_queries_than_keys_has_no_empty_row(sdpa):
    # top-left alignment: query row i sees keys 0..min(i, S-1); row 0 always sees key 0
    q, k, v = make_qkv((1,), 1, 1, 6, 2, 3, 3)
    out = sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(out[0, 0, 0], v.detach()[0, 0, 0], atol=ATOL, rtol=0)
    for i in range(1, 6):
        w = torch.softmax(q.detach()[0, 0, i] @ k.detach()[0, 0].T / math.sqrt(3), -1)
        torch.testing.assert_close(out[0, 0, i], w @ v.detach()[0, 0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# dropout (public API)
# ------------------------------------------------------------------------------------------

def dropout_weights(q, k, p, seed, backend="reference", **kwargs):
    """The dropped-out attention weights, read through value = identity (Ev = S)."""
    seq_k = k.shape[-2]
    eye = torch.eye(seq_k, dtype=q.dtype).expand(*k.shape[:-1], seq_k)
    torch.manual_seed(seed)
    return pa.scaled_dot_product_attention(q.detach(), k.detach(), eye, dropout_p=p,
                                           backend=backend, **kwargs)


def test_dropout_reproducible_with_same_seed():
    q, k, v = make_qkv((2,), 2, 2, 8, 8, 4, 4)
    torch.manual_seed(11)
    a = pa.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(11)
    b = pa.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(12)
    c = pa.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    no_drop = pa.scaled_dot_product_attention(q, k, v)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (a - no_drop).abs().max() > 1e-3


def test_dropout_zero_is_exact():
    q, k, v = make_qkv((2,), 2, 2, 8, 8, 4, 4)
    assert_matches_torch(public_sdpa, q, k, v, dropout_p=0.0)


def test_dropout_keep_rate_and_scaling():
    p = 0.3
    q, k, _ = make_qkv((4,), 4, 4, 32, 32, 8, 8)
    dropped = dropout_weights(q, k, p, seed=5)
    weights = torch.softmax(q.detach() @ k.detach().transpose(-1, -2) / math.sqrt(8), -1)
    kept = dropped != 0
    keep_rate = kept.double().mean().item()
    n = kept.numel()  # 16384 Bernoulli draws: 5 sigma is about 0.018
    assert abs(keep_rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # kept weights are scaled by 1 / (1 - p), dropped ones are exactly 0
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), atol=ATOL, rtol=0)


def test_dropout_is_unbiased():
    """Averaged over many independent masks, dropout's output approaches the plain output."""
    p, copies = 0.5, 4000
    q1, k1, v1 = make_qkv((1,), 1, 1, 3, 4, 2, 2)
    q, k, v = (t.detach().expand(copies, -1, -1, -1) for t in (q1, k1, v1))
    torch.manual_seed(3)
    dropped = pa.scaled_dot_product_attention(q, k, v, dropout_p=p)
    exact = F.scaled_dot_product_attention(q1, k1, v1).detach()[0]
    mean = dropped.mean(0)
    # std of one entry <= max|v| * sqrt(p / (1 - p)); of the mean, that / sqrt(copies)
    bound = 6 * v1.abs().max().item() * math.sqrt(p / (1 - p)) / math.sqrt(copies)
    assert (mean - exact).abs().max().item() < bound
    # and a single draw is far from it (the test can see a biased or absent dropout)
    assert (dropped[0] - exact).abs().max().item() > 1e-2


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_backward_uses_the_forward_mask(is_causal):
    p, seed = 0.35, 21
    q, k, v = make_qkv((2,), 2, 2, 6, 7, 4, 5)
    # the keep mask of this call, recovered through value = identity (same shapes, same seed)
    dropped = dropout_weights(q, k, p, seed, is_causal=is_causal)
    keep = (dropped != 0).double()
    torch.manual_seed(seed)
    out = pa.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal,
                                          backend="reference")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    # an explicit computation with that keep mask
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    scores = leaves[0] @ leaves[1].transpose(-1, -2) / math.sqrt(4)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(6, 7, dtype=torch.bool).tril(), float("-inf"))
    want = (torch.softmax(scores, -1) * keep / (1 - p)) @ leaves[2]
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    torch.testing.assert_close(out.detach(), want.detach(), atol=ATOL, rtol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# float32 through the public API (the CPU path): SPEC section 8, within 1e-4 of float64
# ------------------------------------------------------------------------------------------

def test_float32_sdpa_accuracy():
    torch.manual_seed(0)
    q, k, v = randn(2, 4, 9, 8), randn(2, 2, 7, 8), randn(2, 2, 7, 6)
    mask = randn(9, 7)
    assert_matches_reference(
        lambda q, k, v, m: pa.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
        lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
        [q, k, v, mask], torch.float32, names=["q", "k", "v", "mask"])


def test_float32_output_dtype():
    q, k, v = (t.detach().float() for t in make_qkv((1,), 1, 1, 3, 4, 2, 5))
    out = pa.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 3, 5)


def test_dropout_backward_with_gqa_mask_and_leading_dims():
    p, seed = 0.4, 8
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 4, 5, 3, dtype=F64, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 2, 6, 3, dtype=F64, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 2, 6, 4, dtype=F64, generator=gen).requires_grad_()
    mask = torch.rand(2, 1, 5, 6, generator=gen) > 0.3
    kwargs = dict(attn_mask=mask, enable_gqa=True)
    keep = (dropout_weights(q, k, p, seed, **kwargs) != 0).double()
    torch.manual_seed(seed)
    out = pa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="reference", **kwargs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    k_rep, v_rep = (t.repeat_interleave(2, dim=2) for t in leaves[1:])
    scores = (leaves[0] @ k_rep.transpose(-1, -2) / math.sqrt(3)).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with every key masked give 0
    want = (weights * keep / (1 - p)) @ v_rep
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    torch.testing.assert_close(out.detach(), want.detach(), atol=ATOL, rtol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    assert 0.45 < keep[weights.detach() > 0].mean().item() < 0.75  # some dropped, most kept


@pytest.mark.parametrize("seq_q,seq_k", [(0, 4), (3, 0)])
def test_dropout_on_empty_sequences(seq_q, seq_k):
    q, k, v = make_qkv((2,), 2, 2, seq_q, seq_k, 3, 3)
    out = pa.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert out.shape == (2, 2, seq_q, 3) and (out == 0).all()
