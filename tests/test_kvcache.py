"""flash_attn_with_kvcache (SPEC section 12) on the reference and torch backends: the in-place
append, rotary positions, paging, every option, against the independent oracle of
tests/kvcache_cases.py; validation (errors name the argument, a refused call leaves the caches
untouched) and inference-only behaviour. The Triton kernels' tests are in tests/triton."""
from __future__ import annotations

import pytest
import torch

import peer_attention as pa
from tests.kvcache_cases import F64, Case, make_inputs, run_and_check

OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(6, 1)),
    "window_causal": dict(window_size=(3, -1), causal=True),
    "softcap": dict(softcap=2.5),
    "alibi": dict(alibi_slopes="heads", causal=True),
    "alibi_batch": dict(alibi_slopes="batch"),
    "sinks": dict(sinks=True, causal=True),
    "scale": dict(softmax_scale=0.2),
}

CASES = {
    "contiguous": Case(),
    "queries3_new2": Case(q_len=3, new_len=2),
    "no_append": Case(new_len=0, q_len=2),
    "batch_idx": Case(batch_idx=True, new_len=2),
    "leftpad": Case(leftpad=True, q_len=2),
    "mqa": Case(heads=1, group=4),
    "paged16": Case(page_size=8, capacity=40, q_len=2, new_len=3),
    "paged_page1": Case(page_size=1, capacity=12),
    "paged_odd_leftpad": Case(page_size=5, capacity=40, leftpad=True),
    "rotary_interleaved": Case(rotary="interleaved", q_len=2, new_len=2),
    "rotary_neox": Case(rotary="neox", rotary_dim=16, page_size=4, capacity=24),
}


def resolve(options, case: Case, dtype=F64):
    out = dict(options)
    hq = case.heads * case.group
    if out.get("alibi_slopes") == "heads":
        out["alibi_slopes"] = torch.rand(hq, generator=torch.Generator().manual_seed(4)) * 0.5
    elif out.get("alibi_slopes") == "batch":
        out["alibi_slopes"] = torch.rand(case.batch, hq, generator=torch.Generator().manual_seed(5))
    if out.get("sinks") is True:
        out["sinks"] = torch.randn(hq, generator=torch.Generator().manual_seed(6), dtype=F64).to(dtype)
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_cases_float64(backend, case_name):
    case = CASES[case_name]
    run_and_check(case, backend, F64, causal=case.q_len > 1)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_float64(backend, option):
    for case in (Case(q_len=3, new_len=2, leftpad=True), Case(page_size=6, capacity=36, q_len=2)):
        run_and_check(case, backend, F64, **resolve(OPTIONS[option], case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_backend_low_precision(dtype):
    case = Case(q_len=2, new_len=2, page_size=8, capacity=40, rotary="neox")
    run_and_check(case, "torch", dtype, **resolve(dict(causal=True, sinks=True), case, dtype))


def test_auto_backend_on_cpu_is_torch_and_matches():
    case = Case(q_len=2, new_len=1)
    from tests.helpers import recorded_dispatch
    with recorded_dispatch("select_decode") as seen:
        run_and_check(case, None, torch.float32, causal=True)
    assert len(seen) == 1
    from peer_attention import dispatch
    assert dispatch.select_decode(seen[0]).name == "torch"


def test_int_cache_seqlens_and_whole_cache_default():
    case = Case(new_len=0)
    args = make_inputs(case, F64)
    q, kc, vc = args["q"], args["k_cache"], args["v_cache"]
    full = pa.flash_attn_with_kvcache(q, kc, vc, backend="reference")
    as_int = pa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=kc.shape[1], backend="reference")
    as_tensor = pa.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=torch.full((case.batch,), kc.shape[1], dtype=torch.int32),
        backend="reference")
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True).transpose(1, 2)
    for got in (full, as_int, as_tensor):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_empty_sequence_gives_zero_and_sink_lse():
    case = Case(new_len=0)
    args = make_inputs(case, F64)
    args["cache_seqlens"] = torch.zeros(case.batch, dtype=torch.int32)
    sinks = torch.randn(4, dtype=F64)
    for backend in ("reference", "torch"):
        out, lse = pa.flash_attn_with_kvcache(**args, return_softmax_lse=True, backend=backend)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        out, lse = pa.flash_attn_with_kvcache(**args, sinks=sinks, return_softmax_lse=True,
                                              backend=backend)
        assert torch.equal(out, torch.zeros_like(out))
        torch.testing.assert_close(lse, sinks.float()[None, :, None].expand_as(lse))


# ---- validation: errors name the argument; a refused call writes nothing -----------------------

def _base():
    args = make_inputs(Case(new_len=2, page_size=None), torch.float32)
    return args


BAD = [
    ("q", lambda a: a.update(q=a["q"][0]), ValueError),
    ("k_cache", lambda a: a.update(k_cache=a["k_cache"].half()), TypeError),
    ("v_cache", lambda a: a.update(v_cache=a["v_cache"][:, :, :1]), ValueError),
    ("k_cache", lambda a: a.update(k_cache=a["k_cache"][..., :4]), ValueError),
    ("k", lambda a: a.pop("k"), ValueError),
    ("v", lambda a: a.update(v=a["v"][:, :1]), ValueError),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=a["cache_seqlens"][:2]), ValueError),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=a["cache_seqlens"] + 1), ValueError),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=None), ValueError),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=-1), ValueError),
    ("cache_leftpad", lambda a: a.update(cache_leftpad=a["cache_seqlens"] + 1), ValueError),
    ("cache_batch_idx", lambda a: a.update(cache_batch_idx=torch.tensor([0, 1, 9], dtype=torch.int32)), ValueError),
    ("cache_batch_idx", lambda a: a.update(cache_batch_idx=torch.tensor([0, 1, 1], dtype=torch.int32)), ValueError),
    ("block_table", lambda a: a.update(block_table=torch.zeros(3, 2, dtype=torch.int64)), TypeError),
    ("rotary_sin", lambda a: a.update(rotary_cos=torch.ones(50, 4)), ValueError),
    ("rotary_cos", lambda a: a.update(rotary_cos=torch.ones(50, 20), rotary_sin=torch.ones(50, 20)), ValueError),
    ("rotary_cos", lambda a: a.update(rotary_cos=torch.ones(5, 4), rotary_sin=torch.ones(5, 4)), ValueError),
    ("window_size", lambda a: a.update(window_size=(1,)), TypeError),
    ("softcap", lambda a: a.update(softcap=-1.0), ValueError),
    ("softmax_scale", lambda a: a.update(softmax_scale=float("nan")), ValueError),
    ("alibi_slopes", lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError),
    ("sinks", lambda a: a.update(sinks=torch.ones(3)), ValueError),
    ("num_splits", lambda a: a.update(num_splits=-1), ValueError),
    ("num_splits", lambda a: a.update(num_splits=1.5), TypeError),
    ("causal", lambda a: a.update(causal=1), TypeError),
    ("return_softmax_lse", lambda a: a.update(return_softmax_lse=None), TypeError),
]


@pytest.mark.parametrize("name, edit, error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_argument_and_leaves_caches(name, edit, error):
    args = _base()
    edit(args)
    before = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(error, match=name):
        pa.flash_attn_with_kvcache(**args, backend="reference")
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def test_paged_bad_block_and_batch_idx():
    args = make_inputs(Case(page_size=8, capacity=40, new_len=1), torch.float32)
    table = args["block_table"].clone()
    table[1, 0] = 10_000
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        pa.flash_attn_with_kvcache(**{**args, "block_table": table}, backend="reference")
    with pytest.raises(ValueError, match="cache_batch_idx"):
        pa.flash_attn_with_kvcache(**args, cache_batch_idx=torch.arange(3, dtype=torch.int32))
    assert torch.equal(args["k_cache"], before)


def test_refused_by_backend_leaves_caches_untouched():
    args = _base()
    before = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(NotImplementedError, match="cuda"):
        pa.flash_attn_with_kvcache(**args, backend="cuda")
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def test_inference_only():
    args = _base()
    args["q"].requires_grad_(True)
    with pytest.raises(ValueError, match="q: requires grad.*inference only"):
        pa.flash_attn_with_kvcache(**args)
    with torch.no_grad():
        out = pa.flash_attn_with_kvcache(**args)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("batch, q_len", [(0, 1), (2, 0)])
def test_empty_batch_or_queries(backend, batch, q_len):
    q = torch.randn(batch, q_len, 4, 8)
    k_cache, v_cache = torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 6)
    out, lse = pa.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, backend=backend,
                                          cache_seqlens=torch.full((batch,), 3, dtype=torch.int32),
                                          return_softmax_lse=True)
    assert out.shape == (batch, q_len, 4, 6) and lse.shape == (batch, 4, q_len)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_torch_equal_lengths_read_the_cache_in_place(option):
    """Equal lengths, no pages/rows/leftpad: the torch backend slices the cache (no gather)."""
    case = Case(new_len=2, q_len=2)
    args = make_inputs(case, F64)
    args["cache_seqlens"] = torch.full((case.batch,), 20, dtype=torch.int32)
    options = resolve(OPTIONS[option], case)
    want = pa.flash_attn_with_kvcache(**{**args, "k_cache": args["k_cache"].clone(),
                                         "v_cache": args["v_cache"].clone()},
                                      backend="reference", **options)
    got = pa.flash_attn_with_kvcache(**args, backend="torch", **options)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
