"""patch_torch() / unpatch_torch(): routing of torch.nn.functional.scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

import peer_attention as pa
from tests.helpers import recorded_dispatch
from peer_attention.patching import is_patched

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def always_unpatched():
    assert F.scaled_dot_product_attention is ORIGINAL
    yield
    pa.unpatch_torch()
    assert F.scaled_dot_product_attention is ORIGINAL


@pytest.fixture
def served_calls():
    """The backends that served a call of this package (dispatch.output_and_backend calls that returned)."""
    with recorded_dispatch("output_and_backend", record="backend") as calls:
        yield calls


def qkv(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=gen, dtype=dtype) for n in (5, 7, 7)]


def test_context_manager_routes_and_restores(served_calls):
    q, k, v = qkv()
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    want = ORIGINAL(q, k, v, attn_mask=mask, scale=0.3)
    with pa.patch_torch():
        assert F.scaled_dot_product_attention is not ORIGINAL
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        causal = F.scaled_dot_product_attention(q, k, v, None, 0.0, True)
    assert F.scaled_dot_product_attention is ORIGINAL
    assert len(served_calls) == 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(causal, ORIGINAL(q, k, v, is_causal=True), rtol=0, atol=1e-12)


def test_plain_call_and_unpatch_restore_the_original_object(served_calls):
    pa.patch_torch()
    assert is_patched() and F.scaled_dot_product_attention is not ORIGINAL
    q, k, v = qkv()
    F.scaled_dot_product_attention(q, k, v)
    assert len(served_calls) == 1
    assert pa.unpatch_torch() is True
    assert F.scaled_dot_product_attention is ORIGINAL
    assert pa.unpatch_torch() is False  # nothing left to undo
    F.scaled_dot_product_attention(q, k, v)
    assert len(served_calls) == 1


def test_nested_patches_leave_the_outer_one_in_place():
    with pa.patch_torch():
        patched = F.scaled_dot_product_attention
        with pa.patch_torch():
            assert F.scaled_dot_product_attention is patched
        assert F.scaled_dot_product_attention is patched
    assert F.scaled_dot_product_attention is ORIGINAL


def test_restored_even_when_the_block_raises():
    with pytest.raises(KeyError):
        with pa.patch_torch():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_gradients_through_the_patched_function(served_calls):
    q, k, v = (t.requires_grad_() for t in qkv())
    with pa.patch_torch():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = ORIGINAL(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    assert served_calls
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_calls_a_backend_cannot_serve_fall_through(served_calls):
    q, k, v = qkv(dtype=torch.float32)
    # the CUDA backend never serves CPU tensors: NotImplementedError -> torch's function
    with pa.patch_torch(), pa.use_backend("cuda"):
        with pytest.raises(NotImplementedError):
            pa.scaled_dot_product_attention(q, k, v)
        got = F.scaled_dot_product_attention(q, k, v)
    assert served_calls == []
    torch.testing.assert_close(got, ORIGINAL(q, k, v), rtol=0, atol=0)


def test_arguments_this_package_rejects_reach_torch(served_calls):
    q, k, v = qkv()
    with pa.patch_torch():
        with pytest.raises(RuntimeError):  # torch's own error, not ours
            F.scaled_dot_product_attention(q, k[..., :4], v)
        # an int mask: torch rejects it with its own error
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.int32))
    assert served_calls == []


def test_torch_multihead_attention_runs_through_the_patch(served_calls):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    want, _ = mha(x, x, x, need_weights=False)
    with pa.patch_torch():
        got, _ = mha(x, x, x, need_weights=False)
    assert served_calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_patched_function_compiles_in_full_graph(served_calls):
    q, k, v = (t.float().requires_grad_() for t in qkv())

    def loss_fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()

    want = torch.autograd.grad(ORIGINAL(q, k, v, is_causal=True).square().sum(), (q, k, v))
    with pa.patch_torch():
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert served_calls  # traced through this package's op, not torch's
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch's CausalBias masks (torch.nn.attention.bias): served natively, never read as a tensor
# ---------------------------------------------------------------------------------------------

from torch.nn.attention.bias import causal_lower_right, causal_upper_left  # noqa: E402


@pytest.mark.parametrize("make,bottom_right", [(causal_upper_left, False),
                                               (causal_lower_right, True)],
                         ids=["upper_left", "lower_right"])
def test_causal_bias_is_served_natively(make, bottom_right, served_calls):
    q, k, v = (t.requires_grad_() for t in qkv(3))  # L=5 queries, S=7 keys
    bias = make(5, 7)
    want = ORIGINAL(q, k, v, attn_mask=bias)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    with recorded_dispatch("select") as problems:
        with pa.patch_torch():
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        direct = pa.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    for out in (got, direct):
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        for g, w in zip(torch.autograd.grad(out.sum(), (q, k, v)), want_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert len(served_calls) == 2
    assert all(p.attn_mask is None and p.is_causal and p.bottom_right == bottom_right
               for p in problems)


def test_causal_bias_with_is_causal_raises_as_torch_does():
    q, k, v = qkv(4)
    with pytest.raises(ValueError):
        ORIGINAL(q, k, v, attn_mask=causal_lower_right(5, 7), is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        pa.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 7), is_causal=True)
    with pa.patch_torch(), pytest.raises(ValueError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(5, 7), is_causal=True)


class _Marked(torch.Tensor):
    """A tensor subclass this package does not serve: the patched call falls through."""


def test_causal_bias_falling_through_keeps_torch_s_numbers(served_calls):
    q, k, v = qkv(5)
    q = q.as_subclass(_Marked)
    bias = causal_lower_right(5, 7)
    want = ORIGINAL(q, k, v, attn_mask=bias)
    with pa.patch_torch():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor),
                               rtol=0, atol=1e-12)
