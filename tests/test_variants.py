"""SPEC section 9 variants (window, bottom-right alignment, softcap, ALiBi, sinks) against an
independent float64 formula (tests/independent_variants.py): first the formula itself against
torch, then the reference oracle, then every backend that serves the variant, forward and
backward, through flash_attn_func and peer_attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peer_attention as pa
from peer_attention.reference import peer_attention_reference
from tests import independent_variants as ind
from tests.variant_cases import (F64, assert_close_all, flash_inputs, grads, serving_backends,
                                 sinks_for, slopes_for)

ATOL64 = 1e-10
ATOL32 = 1e-4  # SPEC section 8: float32 within 1e-4 of the float64 result

# (name, flash_attn_func options, q_len, kv_len); sinks/slopes are filled in per case
CASES = [
    ("causal_L<S", dict(causal=True), 5, 7),
    ("causal_L>S", dict(causal=True), 7, 4),  # the first rows see nothing: 0
    ("window", dict(window_size=(2, 1)), 6, 6),
    ("window_left_causal", dict(window_size=(3, -1), causal=True), 5, 9),
    ("window_right_only", dict(window_size=(-1, 2)), 6, 4),
    ("softcap", dict(softcap=2.0), 5, 7),
    ("alibi_per_head", dict(alibi="heads"), 5, 7),
    ("alibi_per_batch_causal", dict(alibi="batch", causal=True), 6, 8),
    ("sinks", dict(sinks=True), 5, 7),
    ("sinks_causal_L>S", dict(sinks=True, causal=True), 6, 3),
    ("all", dict(sinks=True, alibi="heads", softcap=1.5, window_size=(2, 0)), 6, 8),
]


def build(options, batch, num_q_heads, dtype=F64):
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi == "heads":
        options["alibi_slopes"] = slopes_for(num_q_heads)
    elif alibi == "batch":
        options["alibi_slopes"] = slopes_for(batch, num_q_heads)
    if options.pop("sinks", False):
        options["sinks"] = sinks_for(num_q_heads, dtype=dtype)
    return options


def test_independent_formula_is_torch_sdpa_without_variants():
    q, k, v = flash_inputs(num_q_heads=2, num_kv_heads=2)
    out, _ = ind.flash_layout_attention(q, k, v, causal=True, window=(-1, -1))
    # bottom-right causal with L=5, S=7 is an explicit mask for torch
    mask = ind.band(5, 7, 2, -1, 0)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=0, atol=ATOL64)


def test_independent_sink_is_an_extra_value_less_key():
    q, k, v = flash_inputs(num_q_heads=2, num_kv_heads=2)
    sinks = torch.tensor([0.3, -1.2], dtype=F64)
    out, lse = ind.flash_layout_attention(q, k, v, sinks=sinks)
    # a key whose score is the sink and whose value is zero
    k_sink = torch.cat([k, torch.zeros_like(k[:, :1])], dim=1)
    v_sink = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1)
    mask = torch.zeros(2, 1, 8, dtype=F64)
    mask[..., -1] = sinks[:, None]
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k_sink.transpose(1, 2),
                                          v_sink.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=0, atol=ATOL64)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("name, options, q_len, kv_len", CASES, ids=[c[0] for c in CASES])
def test_reference_oracle_matches_independent(name, options, q_len, kv_len):
    q, k, v = flash_inputs(q_len=q_len, kv_len=kv_len)
    opts = build(options, 2, 4)
    left, right = opts.get("window_size", (-1, -1))
    slopes = opts.get("alibi_slopes")
    outs, lses = peer_attention_reference(
        [q.transpose(1, 2)], [k.transpose(1, 2)], [v.transpose(1, 2)], return_lse=True,
        is_causal=opts.get("causal", False), window=(left, right), bottom_right=True,
        softcap=opts.get("softcap", 0.0), sinks=opts.get("sinks"),
        alibi_slopes=None if slopes is None else slopes.expand(2, 4))
    want, want_lse = ind.flash_layout_attention(
        q, k, v, causal=opts.get("causal", False), window=(left, right),
        softcap=opts.get("softcap", 0.0), alibi_slopes=slopes, sinks=opts.get("sinks"))
    got = outs[0].transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL64)
    torch.testing.assert_close(lses[0], want_lse, rtol=0, atol=ATOL64)
    inputs = [q, k, v] + ([opts["sinks"]] if "sinks" in opts else [])
    assert_close_all(grads([got], inputs), grads([want], inputs), ATOL64, "grad")


@pytest.mark.parametrize("name, options, q_len, kv_len", CASES, ids=[c[0] for c in CASES])
def test_flash_attn_func_every_serving_backend(name, options, q_len, kv_len):
    q64, k64, v64 = flash_inputs(q_len=q_len, kv_len=kv_len)
    opts64 = build(options, 2, 4)
    want, want_lse = ind.flash_layout_attention(
        q64, k64, v64, causal=opts64.get("causal", False),
        window=opts64.get("window_size", (-1, -1)), softcap=opts64.get("softcap", 0.0),
        alibi_slopes=opts64.get("alibi_slopes"), sinks=opts64.get("sinks"))
    inputs64 = [q64, k64, v64] + ([opts64["sinks"]] if "sinks" in opts64 else [])
    want_grads = grads([want], inputs64)

    for dtype, atol in ((F64, ATOL64), (torch.float32, ATOL32)):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
        opts = dict(opts64)
        if "sinks" in opts:
            opts["sinks"] = opts64["sinks"].detach().to(dtype).requires_grad_()
        inputs = [q, k, v] + ([opts["sinks"]] if "sinks" in opts else [])
        backends = serving_backends(lambda b: pa.flash_attn_func(q, k, v, backend=b, **opts))
        assert "reference" in backends
        for backend in backends:
            out, lse, probs = pa.flash_attn_func(q, k, v, return_attn_probs=True, backend=backend,
                                                 **opts)
            assert probs is None and out.dtype == dtype and out.is_contiguous()
            what = f"{backend} {dtype}"
            torch.testing.assert_close(out.double(), want, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")
            torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=atol,
                                       msg=lambda m: f"{what} lse: {m}")
            assert_close_all(grads([out], inputs), want_grads, atol, f"{what} grad")


def test_second_order_gradients_of_the_reference_oracle():
    # the oracle function itself (the registered ops' double backward is not this file's concern)
    q, k, v = flash_inputs(batch=1, q_len=3, kv_len=4, num_q_heads=2, num_kv_heads=1,
                           head_dim=3, value_dim=2)
    sinks = sinks_for(2)
    slopes = slopes_for(1, 2)

    def fn(q, k, v, sinks):
        return peer_attention_reference(
            [q.transpose(1, 2)], [k.transpose(1, 2)], [v.transpose(1, 2)], is_causal=True,
            window=(2, -1), bottom_right=True, softcap=1.5, alibi_slopes=slopes, sinks=sinks)[0]

    assert torch.autograd.gradgradcheck(fn, (q, k, v, sinks))


# ------------------------------------------------------------------------------------------------
# peer_attention(softcap=, window=, sinks=): several streams, window top-left on the self pairs
# ------------------------------------------------------------------------------------------------

def streams(lengths, num_q_heads=2, num_kv_heads=1, head_dim=4, value_dim=3, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(heads, n, dim):
        return torch.randn(2, heads, n, dim, generator=gen, dtype=F64).to(dtype).requires_grad_()

    qs = [make(num_q_heads, n, head_dim) for n, _ in lengths]
    ks = [make(num_kv_heads, m, head_dim) for _, m in lengths]
    vs = [make(num_kv_heads, m, value_dim) for _, m in lengths]
    return qs, ks, vs


def independent_peer(qs, ks, vs, *, normalize, softcap, window, is_causal, sinks):
    """Joint: stream s's keys are all streams' keys, banded (top-left) on its own; peer: one
    softmax per pair, summed."""
    left, right = window
    if is_causal:
        right = 0
    scale = qs[0].shape[-1] ** -0.5
    outs = []
    for s, q in enumerate(qs):
        masks = [ind.band(q.shape[2], k.shape[2], 0, left, right) if p == s
                 else torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
                 for p, k in enumerate(ks)]
        if normalize == "joint":
            out, _ = ind.attention(q, torch.cat(ks, 2), torch.cat(vs, 2), scale=scale,
                                   allowed=torch.cat(masks, 1), softcap=softcap, sinks=sinks)
        else:
            out = sum(ind.attention(q, k, v, scale=scale, allowed=m, softcap=softcap)[0]
                      for k, v, m in zip(ks, vs, masks))
        outs.append(out)
    return outs


PEER_CASES = [
    ("joint_window_softcap", "joint", dict(softcap=2.0, window=(1, 1))),
    ("joint_causal_window_sinks", "joint", dict(window=(2, 3), is_causal=True, sinks=True)),
    ("joint_sinks", "joint", dict(sinks=True)),
    ("peer_window_softcap", "peer", dict(softcap=1.0, window=(0, 2))),
]


@pytest.mark.parametrize("name, normalize, options", PEER_CASES, ids=[c[0] for c in PEER_CASES])
def test_peer_attention_variants_every_serving_backend(name, normalize, options):
    lengths = [(4, 5), (3, 2)]
    qs, ks, vs = streams(lengths)
    opts = dict(options)
    sinks = sinks_for(2) if opts.pop("sinks", False) else None
    want = independent_peer(qs, ks, vs, normalize=normalize, softcap=opts.get("softcap", 0.0),
                            window=opts.get("window", (-1, -1)),
                            is_causal=opts.get("is_causal", False), sinks=sinks)
    inputs64 = qs + ks + vs + ([sinks] if sinks is not None else [])
    want_grads = grads(want, inputs64)
    for dtype, atol in ((F64, ATOL64), (torch.float32, ATOL32)):
        cast = [t.detach().to(dtype).requires_grad_() for t in inputs64]
        q, k, v = cast[0:2], cast[2:4], cast[4:6]
        s = cast[6] if sinks is not None else None

        def call(backend):
            return pa.peer_attention(q, k, v, normalize=normalize, enable_gqa=True, sinks=s,
                                     backend=backend, **opts)

        for backend in serving_backends(call):
            outs = call(backend)
            what = f"{backend} {dtype}"
            assert_close_all(outs, want, atol, f"{what} out")
            assert_close_all(grads(outs, cast), want_grads, atol, f"{what} grad")


def test_peer_window_equals_explicit_causal():
    qs, ks, vs = streams([(4, 4)])
    a = pa.peer_attention(qs, ks, vs, window=(-1, 0), enable_gqa=True, backend="reference")
    b = pa.peer_attention(qs, ks, vs, is_causal=True, enable_gqa=True, backend="reference")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(sinks=torch.zeros(2, dtype=F64), normalize="peer"), ValueError, "sinks"),
    (dict(sinks=torch.zeros(3, dtype=F64)), ValueError, "sinks"),
    (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap="1"), TypeError, "softcap"),
    (dict(window=(1,)), TypeError, "window"),
    (dict(window=(1, -2)), ValueError, "window[1]"),
    (dict(window=(1.0, 2)), TypeError, "window[0]"),
], ids=["sinks_peer_mode", "sinks_shape", "sinks_dtype", "softcap_negative", "softcap_type",
        "window_length", "window_below_minus_one", "window_float"])
def test_peer_attention_variant_bad_input(kwargs, error, words):
    qs, ks, vs = streams([(3, 3)])
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        pa.peer_attention(qs, ks, vs, enable_gqa=True, **kwargs)
