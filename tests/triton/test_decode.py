"""The Triton split-KV decode kernels (triton_kernels/decode.py), on a GPU or under the
interpreter: flash_attn_with_kvcache on contiguous and paged caches with every option against
the independent oracle of tests/kvcache_cases.py (SPEC section 8), num_splits changing nothing,
and the drop-in's automatic use of the kernels for decode shapes."""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import peer_attention as pa
from peer_attention.triton_kernels import decode
from tests.kvcache_cases import Case, make_inputs, run_and_check
from tests.test_kvcache import resolve

F32 = torch.float32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    "contiguous_split3": (Case(q_len=2, new_len=2, capacity=56), 3),
    "batch_idx_leftpad": (Case(batch_idx=True, leftpad=True, capacity=48), 2),
    "gqa4_q3": (Case(heads=2, group=4, q_len=3, capacity=40), 0),
    "mqa_rows_over_tile": (Case(heads=1, group=6, q_len=3, capacity=36), 2),
    "paged8_split4": (Case(page_size=8, capacity=64, q_len=2, new_len=3), 4),
    "paged1": (Case(page_size=1, capacity=20), 2),
    "paged5_leftpad": (Case(page_size=5, capacity=45, leftpad=True), 3),
    "rotary_interleaved": (Case(rotary="interleaved", q_len=2, new_len=2, capacity=40), 2),
    "rotary_neox_paged": (Case(rotary="neox", rotary_dim=16, page_size=4, capacity=32), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cases(name):
    case, splits = CASES[name]
    run_and_check(case, "triton", F32, device=DEVICE, causal=case.q_len > 1, num_splits=splits)


OPTIONS = {
    "window": dict(window_size=(9, 2)),
    "window_causal": dict(window_size=(5, -1), causal=True),
    "softcap": dict(softcap=2.5),
    "alibi": dict(alibi_slopes="heads", causal=True),
    "alibi_batch": dict(alibi_slopes="batch"),
    "sinks": dict(sinks=True, causal=True),
    "scale": dict(softmax_scale=0.2),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_options(option, layout):
    case = (Case(q_len=3, new_len=2, leftpad=True, capacity=48) if layout == "contiguous"
            else Case(page_size=6, capacity=48, q_len=2))
    run_and_check(case, "triton", F32, device=DEVICE, num_splits=3,
                  **resolve(OPTIONS[option], case, F32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    case = Case(q_len=2, new_len=2, page_size=8, capacity=48)
    run_and_check(case, "triton", dtype, device=DEVICE, num_splits=3,
                  **resolve(dict(causal=True, sinks=True), case, dtype))


def test_num_splits_changes_nothing_but_speed():
    case = Case(q_len=2, new_len=0, page_size=4, capacity=64, leftpad=True)
    outs = []
    for splits in (1, 2, 5, 16):  # 16: more splits than key tiles (empty ones merge as nothing)
        out, lse, _ = run_and_check(case, "triton", F32, device=DEVICE, num_splits=splits,
                                    causal=True)
        outs.append((out, lse))
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=0, atol=2e-6)
        torch.testing.assert_close(lse, outs[0][1], rtol=0, atol=2e-6)


def test_empty_sequences_and_sinks():
    args = make_inputs(Case(new_len=0), F32, device=DEVICE)
    args["cache_seqlens"] = torch.tensor([0, 3, 0], dtype=torch.int32, device=DEVICE)
    sinks = torch.randn(4, device=DEVICE)
    for splits in (1, 3):
        out, lse = pa.flash_attn_with_kvcache(**args, sinks=sinks, num_splits=splits,
                                              return_softmax_lse=True, backend="triton")
        want, want_lse = pa.flash_attn_with_kvcache(**args, sinks=sinks, return_softmax_lse=True,
                                                    backend="reference")
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


def test_auto_splits_rule():
    assert decode.auto_splits(programs=264, key_tiles=100, sm_count=132) == 1  # the GPU is full
    assert decode.auto_splits(programs=8, key_tiles=1, sm_count=132) == 1      # nothing to split
    assert decode.auto_splits(programs=8, key_tiles=8, sm_count=132) == 4      # >= 2 tiles each
    splits = decode.auto_splits(programs=8, key_tiles=512, sm_count=132)       # B=1, 8 KV heads
    assert 8 * splits >= 2 * 132 and splits <= decode.MAX_SPLITS


# ---- the drop-in picks the decode kernels for decode shapes ------------------------------------

@contextlib.contextmanager
def counted_decode():
    calls = []
    original = decode.decode_attention

    def spy(problem, *args, **kwargs):
        calls.append(problem)
        return original(problem, *args, **kwargs)

    with mock.patch.object(decode, "decode_attention", spy):
        yield calls


@contextlib.contextmanager
def decode_route_off():
    with mock.patch.object(decode, "MIN_DECODE_KEYS", 10 ** 9):
        yield


def _qkv(batch, q_len, kv_len, hq, h, e, dtype=F32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad)
    return make(batch, hq, q_len, e), make(batch, h, kv_len, e), make(batch, h, kv_len, e)


@pytest.mark.parametrize("q_len, is_causal, check_grad", [(1, False, False), (4, False, False),
                                                         (3, True, True)])
def test_sdpa_decode_shape_uses_split_kv_with_the_same_numbers(q_len, is_causal, check_grad):
    q, k, v = _qkv(2, q_len, 150, 4, 2, 16, requires_grad=check_grad)
    with counted_decode() as calls:
        out = pa.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True,
                                              backend="triton")
    assert len(calls) == 1 and calls[0].q.shape[1] == q_len
    with counted_decode() as calls, decode_route_off():
        before = pa.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True,
                                                 backend="triton")
    assert not calls
    torch.testing.assert_close(out, before, rtol=0, atol=2e-6)
    want = pa.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True,
                                           backend="reference")
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    if not check_grad:
        return
    # the backward runs from the decode kernel's lse
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    exact = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_flash_attn_func_decode_shape_uses_split_kv():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 6, 16, generator=g).to(DEVICE)
    k = torch.randn(2, 140, 2, 16, generator=g).to(DEVICE)
    v = torch.randn(2, 140, 2, 8, generator=g).to(DEVICE)
    options = dict(causal=True, window_size=(40, 0), softcap=3.0,
                   sinks=torch.randn(6, generator=g).to(DEVICE))
    with counted_decode() as calls:
        out, lse, _ = pa.flash_attn_func(q, k, v, return_attn_probs=True, backend="triton",
                                         **options)
    assert len(calls) == 1
    with decode_route_off():
        before, before_lse, _ = pa.flash_attn_func(q, k, v, return_attn_probs=True,
                                                   backend="triton", **options)
    torch.testing.assert_close(out, before, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, before_lse, rtol=0, atol=2e-6)


def test_prefill_and_masked_calls_keep_the_regular_kernels():
    q, k, v = _qkv(1, 20, 150, 2, 2, 16)  # L > 16: prefill
    with counted_decode() as calls:
        pa.scaled_dot_product_attention(q, k, v, backend="triton")
        q1 = q[:, :, :1]
        pa.scaled_dot_product_attention(
            q1, k, v, attn_mask=torch.ones(1, 150, dtype=torch.bool, device=DEVICE),
            backend="triton")
        pa.scaled_dot_product_attention(q1, k[:, :, :40], v[:, :, :40], backend="triton")
    assert not calls


def test_varlen_decode_batch_uses_split_kv():
    """flash_attn_varlen_func with one query per sequence (a decode batch in packed layout)."""
    g = torch.Generator().manual_seed(4)
    kv_lens = [130, 40, 200]
    cu_k = torch.tensor([0, 130, 170, 370], dtype=torch.int32, device=DEVICE)
    cu_q = torch.arange(4, dtype=torch.int32, device=DEVICE) * 2
    q = torch.randn(6, 4, 16, generator=g).to(DEVICE)
    k = torch.randn(sum(kv_lens), 2, 16, generator=g).to(DEVICE)
    v = torch.randn(sum(kv_lens), 2, 8, generator=g).to(DEVICE)
    options = dict(causal=True, alibi_slopes=torch.rand(4, generator=g).to(DEVICE),
                   window_size=(50, 0))
    with counted_decode() as calls:
        out, lse, _ = pa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 200, backend="triton",
                                                return_attn_probs=True, **options)
    assert len(calls) == 1
    with decode_route_off():
        before, before_lse, _ = pa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 200,
                                                          backend="triton",
                                                          return_attn_probs=True, **options)
    torch.testing.assert_close(out, before, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, before_lse, rtol=0, atol=2e-6)


@pytest.mark.parametrize("batch, q_len", [(0, 1), (2, 0)])
def test_empty_batch_or_queries(batch, q_len):
    q = torch.randn(batch, q_len, 4, 8, device=DEVICE)
    k_cache = torch.randn(2, 10, 2, 8, device=DEVICE)
    v_cache = torch.randn(2, 10, 2, 6, device=DEVICE)
    out, lse = pa.flash_attn_with_kvcache(q, k_cache, v_cache, backend="triton",
                                          cache_seqlens=torch.full((batch,), 3, dtype=torch.int32,
                                                                   device=DEVICE),
                                          return_softmax_lse=True)
    assert out.shape == (batch, q_len, 4, 6) and lse.shape == (batch, 4, q_len)
