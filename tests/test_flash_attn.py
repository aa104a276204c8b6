"""peer_attention.flash_attn_func / flash_attn_varlen_func: flash-attn 2's layouts and semantics.

Checked against torch's SDPA math with an explicit (bottom-right) mask, the varlen function
against a loop over its sequences, the layouts (views in, contiguous out, lse shapes), and one
test per bad input."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import peer_attention as pa
from tests.helpers import recorded_dispatch
from tests import independent_variants as ind
from tests.variant_cases import (F64, assert_close_all, flash_inputs, grads, serving_backends,
                                 sinks_for, slopes_for)

ATOL = 1e-10


def sdpa_math(q, k, v, *, causal=False, window=(-1, -1), alibi_slopes=None, scale=None):
    """torch's SDPA (math) in flash-attn's layout, the variants as one additive float mask."""
    q_len, kv_len = q.shape[1], k.shape[1]
    left, right = window
    if causal:
        right = 0
    offset = kv_len - q_len
    mask = torch.zeros(q.shape[0], q.shape[2], q_len, kv_len, dtype=q.dtype)
    if alibi_slopes is not None:
        mask = mask + ind.alibi_bias(alibi_slopes.expand(q.shape[0], q.shape[2]), q_len, kv_len,
                                     offset)
    mask = mask.masked_fill(~ind.band(q_len, kv_len, offset, left, right), float("-inf"))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    # torch gives NaN on rows with no key left; flash-attn (and we) give 0
    return torch.nan_to_num(out.transpose(1, 2), nan=0.0)


@pytest.mark.parametrize("options, q_len, kv_len", [
    (dict(), 5, 7),
    (dict(causal=True), 5, 7),
    (dict(causal=True), 6, 6),
    (dict(window_size=(2, 1)), 5, 9),
    (dict(window_size=(1, 0)), 7, 4),
    (dict(alibi_slopes="heads", causal=True), 4, 6),
    (dict(alibi_slopes="batch"), 6, 3),
    (dict(softmax_scale=0.3, causal=True), 5, 5),
], ids=["plain", "causal", "causal_square", "window", "window_causal_L>S", "alibi_causal",
        "alibi_batch", "scale"])
def test_matches_sdpa_math_with_explicit_mask(options, q_len, kv_len):
    q, k, v = flash_inputs(q_len=q_len, kv_len=kv_len)
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = slopes_for(4)
    elif options.get("alibi_slopes") == "batch":
        options["alibi_slopes"] = slopes_for(2, 4)
    got = pa.flash_attn_func(q, k, v, **options)
    want = sdpa_math(q, k, v, causal=options.get("causal", False),
                     window=options.get("window_size", (-1, -1)),
                     alibi_slopes=options.get("alibi_slopes"), scale=options.get("softmax_scale"))
    assert got.shape == (2, q_len, 4, 6) and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert_close_all(grads([got], [q, k, v]), grads([want], [q, k, v]), ATOL, "grad")


def test_inputs_are_viewed_not_copied_and_never_modified():
    q, k, v = flash_inputs()
    before = [t.detach().clone() for t in (q, k, v)]
    with recorded_dispatch("select") as seen:
        out = pa.flash_attn_func(q, k, v, causal=True, softcap=2.0)
    problem = seen[0]
    for given, used in ((q, problem.q), (k, problem.k), (v, problem.v)):
        assert used.data_ptr() == given.data_ptr() and used.shape == given.transpose(1, 2).shape
    assert out.is_contiguous()
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b)


def test_return_attn_probs_gives_out_lse_none():
    q, k, v = flash_inputs(dtype=torch.float32)
    out, lse, probs = pa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    _, want_lse = ind.flash_layout_attention(*(t.double() for t in (q, k, v)), causal=True)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, pa.flash_attn_func(q, k, v, causal=True), rtol=0, atol=0)


def test_dropout_same_seed_same_result_and_scaled_expectation():
    q, k, v = flash_inputs(batch=1, q_len=4, kv_len=4, num_q_heads=2, num_kv_heads=2)
    torch.manual_seed(7)
    a = pa.flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    b = pa.flash_attn_func(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, pa.flash_attn_func(q, k, v))


# ------------------------------------------------------------------------------------------------
# varlen
# ------------------------------------------------------------------------------------------------

Q_LENS = [3, 0, 5, 4]
K_LENS = [5, 2, 5, 1]  # L < S, an empty query, L == S, L > S (rows with nothing to see)


def packed(num_q_heads=4, num_kv_heads=2, dtype=F64, q_lens=Q_LENS, k_lens=K_LENS):
    gen = torch.Generator().manual_seed(5)

    def make(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()

    q = make(sum(q_lens), num_q_heads, 8)
    k = make(sum(k_lens), num_kv_heads, 8)
    v = make(sum(k_lens), num_kv_heads, 6)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(k_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def per_sequence(q, k, v, cu_q, cu_k, **options):
    """flash_attn_func on each sequence alone, concatenated."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        out, lse, _ = pa.flash_attn_func(q[None, qs], k[None, ks], v[None, ks],
                                         return_attn_probs=True, **options)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)


VARLEN_CASES = [
    ("plain", dict()),
    ("causal", dict(causal=True)),
    ("window", dict(window_size=(1, 2))),
    ("softcap_causal", dict(softcap=1.5, causal=True)),
    ("alibi", dict(alibi_slopes=True, causal=True)),
    ("sinks_window", dict(sinks=True, window_size=(2, 0))),
]


@pytest.mark.parametrize("name, options", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_equals_per_sequence_loop(name, options):
    q64, k64, v64, cu_q, cu_k = packed()
    options = dict(options)
    with_sinks = options.pop("sinks", False)
    if options.pop("alibi_slopes", False):
        options["alibi_slopes"] = slopes_for(4)
    sinks64 = sinks_for(4) if with_sinks else None
    inputs64 = [q64, k64, v64] + ([sinks64] if with_sinks else [])
    want, want_lse = per_sequence(q64, k64, v64, cu_q, cu_k, sinks=sinks64, **options)
    want_grads = grads([want], inputs64)
    # the rows of the last sequence that see no key (causal, L > S) are exactly 0
    if options.get("causal"):
        assert torch.equal(want[-4:-1], torch.zeros_like(want[-4:-1])) and want[-1].abs().sum() > 0
    max_q, max_k = max(Q_LENS), max(K_LENS)
    for dtype, atol in ((F64, ATOL), (torch.float32, 1e-4)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in inputs64]
        q, k, v = inputs[:3]
        sinks = inputs[3] if with_sinks else None

        def call(backend, **extra):
            return pa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, sinks=sinks,
                                             backend=backend, **options, **extra)

        for backend in serving_backends(call):
            out, lse, probs = call(backend, return_attn_probs=True)
            what = f"{backend} {dtype}"
            assert probs is None and out.shape == (q.shape[0], 4, 6) and lse.shape == (4, q.shape[0])
            torch.testing.assert_close(out.double(), want, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")
            torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=atol,
                                       msg=lambda m: f"{what} lse: {m}")
            assert_close_all(grads([out], inputs), want_grads, atol, f"{what} grad")


def test_varlen_one_sequence_is_flash_attn_func():
    q, k, v, cu_q, cu_k = packed(q_lens=[4], k_lens=[6])
    got = pa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 6, causal=True)
    want = pa.flash_attn_func(q[None], k[None], v[None], causal=True)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_varlen_views_and_diagonal_peer_table():
    q, k, v, cu_q, cu_k = packed()
    with recorded_dispatch("select") as seen:
        pa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True)
    problem = seen[0]
    assert problem.peers == () and problem.q_lens == tuple(Q_LENS) and problem.kv_lens == tuple(K_LENS)
    assert problem.bottom_right and problem.q.shape == (1, 4, sum(Q_LENS), 8)
    assert problem.q.data_ptr() == q.data_ptr() and problem.k.data_ptr() == k.data_ptr()


# ------------------------------------------------------------------------------------------------
# bad input: one test each, the message names the argument
# ------------------------------------------------------------------------------------------------

def call_flash(**change):
    q, k, v = flash_inputs()
    args = dict(q=q, k=k, v=v)
    args.update(change)
    return pa.flash_attn_func(**args)


FLASH_BAD = [
    ("q_not_tensor", dict(q=[1.0]), TypeError, "q"),
    ("q_3d", dict(q=torch.zeros(5, 4, 8, dtype=F64)), ValueError, "q"),
    ("k_dtype", dict(k=torch.zeros(2, 7, 2, 8, dtype=torch.float32)), TypeError, "k"),
    ("k_head_dim", dict(k=torch.zeros(2, 7, 2, 5, dtype=F64)), ValueError, "k"),
    ("k_batch", dict(k=torch.zeros(3, 7, 2, 8, dtype=F64), v=torch.zeros(3, 7, 2, 6, dtype=F64)),
     ValueError, "k"),
    ("v_length", dict(v=torch.zeros(2, 6, 2, 6, dtype=F64)), ValueError, "v"),
    ("heads_not_multiple", dict(k=torch.zeros(2, 7, 3, 8, dtype=F64),
                                v=torch.zeros(2, 7, 3, 6, dtype=F64)), ValueError, "Hq=4"),
    ("dropout_range", dict(dropout_p=1.5), ValueError, "dropout_p"),
    ("softmax_scale_nan", dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("softmax_scale_type", dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("causal_not_bool", dict(causal=1), TypeError, "causal"),
    ("window_one_int", dict(window_size=3), TypeError, "window_size"),
    ("window_three", dict(window_size=(1, 2, 3)), TypeError, "window_size"),
    ("window_float", dict(window_size=(1.5, 2)), TypeError, r"window_size\[0\]"),
    ("window_below", dict(window_size=(-1, -3)), ValueError, r"window_size\[1\]"),
    ("softcap_negative", dict(softcap=-0.5), ValueError, "softcap"),
    ("softcap_inf", dict(softcap=float("inf")), ValueError, "softcap"),
    ("alibi_dtype", dict(alibi_slopes=torch.zeros(4, dtype=F64)), TypeError, "alibi_slopes"),
    ("alibi_shape", dict(alibi_slopes=torch.zeros(3, dtype=torch.float32)), ValueError, "alibi_slopes"),
    ("alibi_3d", dict(alibi_slopes=torch.zeros(1, 2, 4, dtype=torch.float32)), ValueError, "alibi_slopes"),
    ("sinks_shape", dict(sinks=torch.zeros(2, dtype=F64)), ValueError, "sinks"),
    ("sinks_dtype", dict(sinks=torch.zeros(4, dtype=torch.int32)), TypeError, "sinks"),
    ("sinks_with_dropout", dict(sinks=torch.zeros(4, dtype=F64), dropout_p=0.1), ValueError, "dropout_p"),
    ("deterministic_not_bool", dict(deterministic="yes"), TypeError, "deterministic"),
    ("return_attn_probs_not_bool", dict(return_attn_probs=None), TypeError, "return_attn_probs"),
    ("backend_unknown", dict(backend="flash"), ValueError, "backend"),
]


@pytest.mark.parametrize("name, change, error, words", FLASH_BAD, ids=[c[0] for c in FLASH_BAD])
def test_flash_attn_func_bad_input(name, change, error, words):
    with pytest.raises(error, match=words):
        call_flash(**change)


def call_varlen(**change):
    q, k, v, cu_q, cu_k = packed()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5)
    args.update(change)
    return pa.flash_attn_varlen_func(**args)


I32 = torch.int32
VARLEN_BAD = [
    ("q_4d", dict(q=torch.zeros(1, 12, 4, 8, dtype=F64)), ValueError, "q"),
    ("cu_not_tensor", dict(cu_seqlens_q=[0, 3, 12]), TypeError, "cu_seqlens_q"),
    ("cu_int64", dict(cu_seqlens_q=torch.tensor([0, 3, 3, 8, 12])), TypeError, "cu_seqlens_q"),
    ("cu_2d", dict(cu_seqlens_k=torch.zeros(2, 3, dtype=I32)), ValueError, "cu_seqlens_k"),
    ("cu_not_from_zero", dict(cu_seqlens_q=torch.tensor([1, 3, 3, 8, 12], dtype=I32)),
     ValueError, "cu_seqlens_q"),
    ("cu_decreasing", dict(cu_seqlens_k=torch.tensor([0, 5, 4, 12, 13], dtype=I32)),
     ValueError, "cu_seqlens_k"),
    ("cu_wrong_total", dict(cu_seqlens_q=torch.tensor([0, 3, 3, 8, 11], dtype=I32)),
     ValueError, "total_q"),
    ("cu_batch_mismatch", dict(cu_seqlens_k=torch.tensor([0, 5, 13], dtype=I32)),
     ValueError, "cu_seqlens_k"),
    ("max_seqlen_q_small", dict(max_seqlen_q=4), ValueError, "max_seqlen_q"),
    ("max_seqlen_k_type", dict(max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
    ("dropout", dict(dropout_p=0.1), ValueError, "dropout_p"),
    ("alibi_per_sequence", dict(alibi_slopes=torch.rand(4, 4)), ValueError, "alibi_slopes"),
    ("alibi_batch_shape", dict(alibi_slopes=torch.rand(2, 4)), ValueError, "alibi_slopes"),
    ("window", dict(window_size=(0,)), TypeError, "window_size"),
    ("heads", dict(k=torch.zeros(13, 3, 8, dtype=F64), v=torch.zeros(13, 3, 6, dtype=F64)),
     ValueError, "Hq=4"),
]


@pytest.mark.parametrize("name, change, error, words", VARLEN_BAD, ids=[c[0] for c in VARLEN_BAD])
def test_flash_attn_varlen_func_bad_input(name, change, error, words):
    with pytest.raises(error, match=words):
        call_varlen(**change)


def test_bad_input_leaves_tensors_untouched():
    q, k, v, cu_q, cu_k = packed()
    before = [t.detach().clone() for t in (q, k, v, cu_q, cu_k)]
    with pytest.raises(ValueError):
        pa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 5)
    for t, b in zip((q, k, v, cu_q, cu_k), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torchs_own_error(dtype):
    # SPEC section 8: at most 2x the error of the same formula computed by torch in `dtype`
    from tests.helpers import assert_matches_reference

    q, k, v = flash_inputs(q_len=6, kv_len=9)
    sinks = sinks_for(4)
    slopes = slopes_for(4)
    options = dict(causal=True, window_size=(4, -1), softcap=2.0)

    def ours(q, k, v, sinks):
        return pa.flash_attn_func(q, k, v, alibi_slopes=slopes, sinks=sinks, **options)

    def formula(q, k, v, sinks):
        return ind.flash_layout_attention(q, k, v, alibi_slopes=slopes, sinks=sinks,
                                          causal=True, window=(4, -1), softcap=2.0)[0]

    assert_matches_reference(ours, formula, [q, k, v, sinks], dtype,
                             names=["q", "k", "v", "sinks"])


def test_torch_compile_fullgraph_traces_flash_attn_func():
    q, k, v = flash_inputs(batch=1, q_len=5, kv_len=7, dtype=torch.float32)
    sinks = sinks_for(4, dtype=torch.float32)
    slopes = slopes_for(4)

    def fn(q, k, v, sinks):
        return pa.flash_attn_func(q, k, v, causal=True, window_size=(3, -1), softcap=2.0,
                                  alibi_slopes=slopes, sinks=sinks)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k, v, sinks), fn(q, k, v, sinks)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    inputs = [q, k, v, sinks]
    assert_close_all(grads([got], inputs), grads([want], inputs), 0.0, "compiled grad")
