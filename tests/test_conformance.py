"""Conformance with torch: pa.scaled_dot_product_attention and the patched
torch.nn.functional.scaled_dot_product_attention against torch's math backend, in float64,
over the argument space torch accepts (outputs, dtypes, shapes and first-order gradients), and
over the calls torch rejects (direct calls raise ValueError/TypeError naming the argument; under
the patch the call falls through, so the exception type is torch's own).

Dropout with 0 < p < 1 is compared only through torch's own gradcheck options (batched
gradients, fast mode) with a fixed seed, as torch's test_transformers.py runs it; its numbers are
checked in tests/backends/test_torch_backend.py (bit for bit on the CPU),
tests/triton/test_dropout.py and the reference tests."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import peer_attention as pa
from peer_attention import dispatch

ORIGINAL = F.scaled_dot_product_attention
F64 = torch.float64
_gen = torch.Generator()


def r(*shape, dtype=F64):
    return torch.randn(*shape, generator=_gen, dtype=dtype)


def bools(*shape, p=0.3):
    return torch.rand(*shape, generator=_gen) > p


def call(q, k, v, **kw):
    return (q, k, v), kw


# (id, builder returning ((q, k, v), kwargs)); every tensor argument float64 unless said
ACCEPTED = [
    ("plain", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4))),
    ("value_dim_differs", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 7))),
    ("no_batch_3d", lambda: call(r(3, 5, 4), r(3, 6, 4), r(3, 6, 4))),
    ("two_dims", lambda: call(r(5, 4), r(6, 4), r(6, 4))),
    ("five_dims", lambda: call(r(2, 2, 3, 5, 4), r(2, 2, 3, 6, 4), r(2, 2, 3, 6, 4))),
    ("kv_batch_broadcast", lambda: call(r(2, 3, 5, 4), r(1, 3, 6, 4), r(1, 3, 6, 4))),
    ("q_batch_broadcast", lambda: call(r(1, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4))),
    ("kv_one_head", lambda: call(r(2, 3, 5, 4), r(2, 1, 6, 4), r(2, 1, 6, 4))),
    ("value_one_head", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 1, 6, 4))),
    ("query_one_head", lambda: call(r(2, 1, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4))),
    ("kv_fewer_dims", lambda: call(r(2, 3, 5, 4), r(3, 6, 4), r(3, 6, 4))),
    ("q_fewer_dims", lambda: call(r(3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4))),
    ("gqa", lambda: call(r(2, 4, 5, 4), r(2, 2, 6, 4), r(2, 2, 6, 4), enable_gqa=True)),
    ("gqa_batch_broadcast", lambda: call(r(2, 4, 5, 4), r(1, 2, 6, 4), r(1, 2, 6, 4),
                                         enable_gqa=True)),
    ("gqa_key_value_heads_differ", lambda: call(r(2, 4, 5, 4), r(2, 2, 6, 4), r(2, 4, 6, 4),
                                                enable_gqa=True)),
    ("gqa_equal_heads", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                     enable_gqa=True)),
    ("causal_square", lambda: call(r(2, 3, 6, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), is_causal=True)),
    ("causal_fewer_queries", lambda: call(r(2, 3, 4, 4), r(2, 3, 7, 4), r(2, 3, 7, 4),
                                          is_causal=True)),
    ("causal_more_queries", lambda: call(r(2, 3, 7, 4), r(2, 3, 4, 4), r(2, 3, 4, 4),
                                         is_causal=True)),
    ("bool_mask_2d", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                  attn_mask=bools(5, 6))),
    ("bool_mask_per_batch", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                         attn_mask=bools(2, 1, 5, 6))),
    ("bool_mask_keys_only", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                         attn_mask=bools(6))),
    ("bool_mask_rows_fully_masked", lambda: call(
        r(1, 2, 3, 4), r(1, 2, 4, 4), r(1, 2, 4, 4),
        attn_mask=torch.tensor([[False] * 4, [True, False, True, False], [False] * 4]))),
    ("float_mask", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                attn_mask=r(3, 5, 6).requires_grad_())),
    ("float32_mask_with_float64_query", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                                     attn_mask=r(5, 6, dtype=torch.float32))),
    ("float_mask_with_inf", lambda: call(
        r(1, 2, 3, 4), r(1, 2, 4, 4), r(1, 2, 4, 4),
        attn_mask=torch.tensor([0.0, -float("inf"), 0.5, -1.0], dtype=F64))),
    ("mask_broadcast_batch", lambda: call(r(1, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                          attn_mask=bools(2, 3, 5, 6))),
    ("scale", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), scale=0.37)),
    ("scale_int", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), scale=2)),
    ("scale_zero", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), scale=0.0)),
    ("scale_negative", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), scale=-0.5)),
    ("no_queries", lambda: call(r(2, 3, 0, 4), r(2, 3, 6, 4), r(2, 3, 6, 4))),
    ("no_keys", lambda: call(r(2, 3, 5, 4), r(2, 3, 0, 4), r(2, 3, 0, 4))),
    ("head_dim_zero", lambda: call(r(2, 3, 5, 0), r(2, 3, 6, 0), r(2, 3, 6, 4))),
    ("dropout_one", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), dropout_p=1.0)),
    ("dropout_int_zero", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), dropout_p=0)),
    ("causal_bias_upper_left", lambda: call(r(2, 3, 4, 4), r(2, 3, 7, 4), r(2, 3, 7, 4),
                                            attn_mask=causal_upper_left(4, 7))),
    ("causal_bias_lower_right", lambda: call(r(2, 3, 4, 4), r(2, 3, 7, 4), r(2, 3, 7, 4),
                                             attn_mask=causal_lower_right(4, 7))),
    ("causal_bias_lower_right_square", lambda: call(r(2, 3, 5, 4), r(2, 3, 5, 4), r(2, 3, 5, 4),
                                                    attn_mask=causal_lower_right(5, 5))),
    ("causal_bias_lower_right_gqa", lambda: call(r(1, 4, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4),
                                                 attn_mask=causal_lower_right(3, 5),
                                                 enable_gqa=True)),
]


def math(args, kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return ORIGINAL(*args, **kwargs)


def direct(args, kwargs):
    return pa.scaled_dot_product_attention(*args, **kwargs)


def patched(args, kwargs):
    with pa.patch_torch():
        return F.scaled_dot_product_attention(*args, **kwargs)


OURS = {"direct": direct, "patched": patched}


def fresh(args, kwargs):
    """Leaf copies that require grad (float tensors), so each run has its own gradients."""
    def leaf(t):
        if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.is_floating_point():
            return t.detach().clone().requires_grad_()
        return t
    return [leaf(t) for t in args], {n: leaf(t) for n, t in kwargs.items()}


def output_and_grads(fn, args, kwargs):
    args, kwargs = fresh(args, kwargs)
    out = fn(args, kwargs)
    leaves = [t for t in list(args) + list(kwargs.values())
              if isinstance(t, torch.Tensor) and t.requires_grad]
    if out.numel() == 0:
        return out, []
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, torch.autograd.grad(out, leaves, grad_out, allow_unused=True)


@pytest.mark.parametrize("ours", sorted(OURS))
@pytest.mark.parametrize("build", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_calls_match_torch_math(build, ours, monkeypatch):
    _gen.manual_seed(0)
    args, kwargs = build()
    want, want_grads = output_and_grads(math, args, kwargs)
    served = []
    run = dispatch.output_and_backend
    monkeypatch.setattr(dispatch, "output_and_backend", lambda *a, **kw: served.append(1) or run(*a, **kw))
    got, got_grads = output_and_grads(OURS[ours], args, kwargs)
    assert served, "served by torch (fell through), not by peer_attention"
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)
    assert len(got_grads) == len(want_grads)
    for mine, theirs in zip(got_grads, want_grads):
        if theirs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ours", sorted(OURS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_other_dtypes_keep_torch_s_output_dtype(dtype, ours):
    _gen.manual_seed(1)
    args = [r(2, 3, 5, 4, dtype=dtype), r(2, 3, 6, 4, dtype=dtype), r(2, 3, 6, 4, dtype=dtype)]
    kwargs = {"attn_mask": r(5, 6, dtype=torch.float32)}  # torch also takes a float32 mask
    want = math(args, kwargs)
    got = OURS[ours](args, kwargs)
    assert got.dtype == want.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("ours", sorted(OURS))
@pytest.mark.parametrize("device_dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_torch(ours, device_dtype):
    """Under CPU autocast torch casts q, k, v and a float mask (float64 excepted) first, so
    mixed dtypes are accepted and the output has the autocast dtype."""
    _gen.manual_seed(2)
    args = [r(2, 3, 5, 4, dtype=torch.float32), r(2, 3, 6, 4, dtype=torch.bfloat16),
            r(2, 3, 6, 4, dtype=torch.float32)]
    kwargs = {"attn_mask": r(5, 6, dtype=torch.float32)}
    with torch.autocast("cpu", dtype=device_dtype):
        want = math(args, kwargs)
        got = OURS[ours](args, kwargs)
        untouched = OURS[ours]([t.double() for t in args], {})  # float64 is never cast
    assert got.dtype == want.dtype == device_dtype
    assert untouched.dtype == F64
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)


def test_autocast_backward_gives_input_dtype_gradients():
    _gen.manual_seed(3)
    q, k, v = (r(1, 2, 4, 4, dtype=torch.float32).requires_grad_() for _ in range(3))
    with torch.autocast("cpu"):
        out = pa.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().max() > 0


def test_dropout_one_gives_zero_gradients():
    _gen.manual_seed(4)
    q, k, v = (r(1, 2, 3, 4).requires_grad_() for _ in range(3))
    pa.scaled_dot_product_attention(q, k, v, dropout_p=1.0).sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in (q, k, v))


def test_caller_tensors_are_not_modified():
    _gen.manual_seed(5)
    args, kwargs = call(r(2, 1, 5, 4), r(1, 3, 6, 4), r(1, 3, 6, 4), attn_mask=r(5, 6))
    before = [t.clone() for t in args] + [kwargs["attn_mask"].clone()]
    pa.scaled_dot_product_attention(*args, **kwargs)
    for t, b in zip(list(args) + [kwargs["attn_mask"]], before):
        assert torch.equal(t, b)


# (id, builder, the exception a direct call raises)
REJECTED = [
    ("one_dim", lambda: call(r(4), r(4), r(4)), ValueError),
    ("key_head_dim_differs", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 3), r(2, 3, 6, 4)), ValueError),
    ("value_length_differs", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 7, 4)), ValueError),
    ("batch_not_broadcastable", lambda: call(r(2, 3, 5, 4), r(3, 3, 6, 4), r(3, 3, 6, 4)),
     ValueError),
    ("heads_without_gqa", lambda: call(r(2, 4, 5, 4), r(2, 2, 6, 4), r(2, 2, 6, 4)), ValueError),
    ("gqa_not_multiple", lambda: call(r(2, 3, 5, 4), r(2, 2, 6, 4), r(2, 2, 6, 4),
                                      enable_gqa=True), ValueError),
    ("dtypes_differ", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4, dtype=torch.float32),
                                   r(2, 3, 6, 4)), TypeError),
    ("integer_inputs", lambda: call(*(torch.ones(1, 2, 3, 4, dtype=torch.int64),) * 3), TypeError),
    ("mask_and_causal", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                     attn_mask=bools(5, 6), is_causal=True), ValueError),
    ("mask_integer", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                  attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError),
    ("mask_float16_with_float64", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                               attn_mask=r(5, 6, dtype=torch.float16)), TypeError),
    ("mask_not_broadcastable", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                            attn_mask=bools(4, 6)), ValueError),
    ("mask_larger_than_output", lambda: call(r(1, 3, 5, 4), r(1, 3, 6, 4), r(1, 3, 6, 4),
                                             attn_mask=bools(2, 3, 5, 6)), ValueError),
    ("dropout_above_one", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4),
                                       dropout_p=1.5), ValueError),
    ("dropout_str", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), dropout_p="0"),
     TypeError),
    ("is_causal_int", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), is_causal=1),
     TypeError),
    ("scale_str", lambda: call(r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4), scale="1"), TypeError),
    ("query_not_tensor", lambda: call([[1.0]], r(2, 3, 6, 4), r(2, 3, 6, 4)), TypeError),
    ("causal_bias_with_is_causal", lambda: call(r(2, 3, 4, 4), r(2, 3, 7, 4), r(2, 3, 7, 4),
                                                attn_mask=causal_lower_right(4, 7),
                                                is_causal=True), ValueError),
]


@pytest.mark.parametrize("build,error", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejected_calls(build, error):
    """Direct calls raise; patched calls fall through and do exactly what unpatched torch does
    (its default CPU kernel accepts a few calls its math backend rejects: then the same result)."""
    _gen.manual_seed(6)
    args, kwargs = build()
    with pytest.raises(error):
        direct(args, kwargs)
    with pytest.raises(Exception):  # noqa: B017 - torch's math backend rejects every case too
        math(args, kwargs)
    try:
        want = ORIGINAL(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises is the expectation
        with pytest.raises(type(exc)):
            patched(args, kwargs)
    else:
        torch.testing.assert_close(patched(args, kwargs), want)


def test_nested_tensors():
    _gen.manual_seed(7)
    nested = torch.nested.nested_tensor([r(3, 4, 5), r(3, 2, 5)], layout=torch.jagged)
    q = nested.transpose(1, 2)  # (B, H, j, E)
    with pytest.raises(TypeError, match="query: nested"):
        pa.scaled_dot_product_attention(q, q, q)
    want = ORIGINAL(q, q, q)
    got = patched((q, q, q), {})
    for a, b in zip(got.unbind(), want.unbind()):
        torch.testing.assert_close(a, b)


def test_registered_ops_cast_under_autocast_and_run_their_kernels_without_it():
    """The ops' Autocast kernels: q, k, v and a float mask cast to the autocast dtype, then the
    kernel runs with autocast off (the reference's own matmuls are not autocast again), so the
    result is bit for bit the op's on pre-cast inputs."""
    from peer_attention.api import sdpa_problem

    _gen.manual_seed(8)
    q, k, v = (r(1, 2, 5, 4, dtype=torch.float32) for _ in range(3))
    mask = r(5, 5, dtype=torch.float32)
    op = dispatch.forward_op("reference")
    problem = sdpa_problem(q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = op(*problem)
    cast = problem._replace(q=problem.q.bfloat16(), k=problem.k.bfloat16(),
                            v=problem.v.bfloat16(), attn_mask=problem.attn_mask.bfloat16())
    want, _ = op(*cast)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_peer_attention_under_autocast():
    _gen.manual_seed(9)
    qs = [r(1, 2, n, 4, dtype=torch.float32) for n in (3, 2)]
    gate = r(2, 2, 1, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = pa.peer_attention(qs, qs, qs, gate=gate)
    want = pa.peer_attention([t.bfloat16() for t in qs], [t.bfloat16() for t in qs],
                             [t.bfloat16() for t in qs], gate=gate)
    for o, w in zip(outs, want):
        assert o.dtype == torch.bfloat16
        assert torch.equal(o, w)


BAD_DROPOUT = [-0.1, -1e-9, 1.5, float("nan"), float("inf")]


@pytest.mark.parametrize("dropout_p", BAD_DROPOUT, ids=str)
def test_dropout_outside_unit_interval_is_rejected(dropout_p):
    """torch raises (a RuntimeError) for dropout_p < 0, > 1 or NaN; a direct call raises a
    ValueError naming dropout_p that is also a RuntimeError; a patched call raises torch's own."""
    _gen.manual_seed(10)
    args = (r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4))
    for runtime_error in (ValueError, RuntimeError):
        with pytest.raises(runtime_error, match="dropout_p"):
            pa.scaled_dot_product_attention(*args, dropout_p=dropout_p)
    with pytest.raises(RuntimeError):
        ORIGINAL(*args, dropout_p=dropout_p)
    with pytest.raises(RuntimeError):
        patched(args, {"dropout_p": dropout_p})


@pytest.mark.parametrize("dropout_p", [True, torch.tensor(0.0), torch.tensor(1)], ids=str)
def test_dropout_types_torch_accepts(dropout_p):
    """torch's argument parser also takes a bool and a 0-dim tensor (not requiring grad)."""
    _gen.manual_seed(11)
    args = (r(1, 2, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4))
    torch.testing.assert_close(pa.scaled_dot_product_attention(*args, dropout_p=dropout_p),
                               ORIGINAL(*args, dropout_p=dropout_p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout_p", [None, "0.1", 1j, torch.tensor([0.1]),
                                       torch.tensor(0.1, requires_grad=True)], ids=str)
def test_dropout_types_torch_rejects(dropout_p):
    args = (r(1, 2, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4))
    with pytest.raises(TypeError, match="dropout_p"):
        pa.scaled_dot_product_attention(*args, dropout_p=dropout_p)
    with pytest.raises(TypeError):
        ORIGINAL(*args, dropout_p=dropout_p)


def _with_seed(fn):
    """torch's wrapper_set_seed (common_methods_invocations): every call draws from seed 42 and
    leaves the global generator as it found it."""
    def call(*args):
        state = torch.get_rng_state()
        try:
            torch.manual_seed(42)
            return fn(*args)
        finally:
            torch.set_rng_state(state)
    return call


DROPOUT_GRADCHECK = {
    "patched": lambda q, k, v, p: patched((q, k, v, None, p), {}),
    "direct": lambda q, k, v, p: pa.scaled_dot_product_attention(q, k, v, None, p),
    "reference": lambda q, k, v, p: pa.scaled_dot_product_attention(q, k, v, None, p,
                                                                    backend="reference"),
}


@pytest.mark.parametrize("how", sorted(DROPOUT_GRADCHECK))
@pytest.mark.parametrize("input_dim", [3, 4])
def test_dropout_gradcheck_with_torch_s_options(how, input_dim):
    """torch's test_scaled_dot_product_attention (no mask, dropout 0.2/0.5) runs
    common_utils.gradcheck: check_batched_grad=True and fast_mode=True, i.e. the backward runs
    under vmap, which refuses random operations: the backward must reuse the forward's mask."""
    _gen.manual_seed(12)
    batch = (5,) if input_dim == 3 else (5, 2)
    q, k, v = (r(*batch, n, 6).requires_grad_() for n in (4, 3, 3))
    fn = DROPOUT_GRADCHECK[how]
    for p in (0.2, 0.5):
        assert torch.autograd.gradcheck(_with_seed(lambda *a: fn(*a, p)), (q, k, v),
                                        check_batched_grad=True, fast_mode=True)
