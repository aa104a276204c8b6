"""flash_attn_with_kvcache and the drop-in's decode route on CUDA at GPU-scale shapes (caches of
4k-16k tokens, head dims 64/128/256, GQA, contiguous and paged with pages of 16 and 256,
float16/bfloat16) against the float64 oracle of tests/kvcache_cases.py under SPEC section 8,
with the compiled split-KV kernels (auto num_splits and forced ones). Skipped without CUDA."""
import pytest
import torch

import peer_attention as pa
from peer_attention.triton_kernels import decode
from tests.kvcache_cases import Case, run_and_check

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16, FP16 = torch.bfloat16, torch.float16

CASES = [
    # id, Case, dtype, options
    ("contig-4k-E128-gqa4-bf16-causal", Case(batch=4, heads=8, group=4, head_dim=128,
                                             value_dim=128, capacity=4096, new_len=1),
     BF16, dict(causal=True)),
    ("paged16-8k-E128-gqa8-fp16-q4", Case(batch=2, heads=2, group=8, head_dim=128, value_dim=128,
                                          capacity=8192, page_size=16, q_len=4, new_len=4),
     FP16, dict(causal=True)),
    ("paged256-16k-E64-mha-bf16-window", Case(batch=2, heads=4, group=1, head_dim=64, value_dim=64,
                                              capacity=16384, page_size=256, new_len=1),
     BF16, dict(window_size=(4096, 0))),
    ("contig-4k-E256-mqa-fp16-rotary-sinks", Case(batch=3, heads=1, group=8, head_dim=256,
                                                  value_dim=256, capacity=4096, new_len=1,
                                                  rotary="neox", rotary_dim=64, leftpad=True),
     FP16, dict(causal=True, sinks="yes")),
]


@pytest.mark.parametrize("splits", [0, 7])
@pytest.mark.parametrize("name, case, dtype, options", CASES, ids=[c[0] for c in CASES])
def test_kvcache(name, case, dtype, options, splits):
    options = dict(options)
    if options.get("sinks") == "yes":
        options["sinks"] = torch.randn(case.heads * case.group, dtype=torch.float64).to(dtype)
    run_and_check(case, "triton", dtype, device="cuda", num_splits=splits, **options)


@pytest.mark.parametrize("q_len", [1, 8])
def test_sdpa_decode_route(q_len):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 32, q_len, 128, generator=gen, device="cuda", dtype=BF16)
    k = torch.randn(2, 8, 6000, 128, generator=gen, device="cuda", dtype=BF16)
    v = torch.randn(2, 8, 6000, 128, generator=gen, device="cuda", dtype=BF16)
    calls = []
    original = decode.decode_attention

    def spy(problem, *args, **kwargs):
        calls.append(problem)
        return original(problem, *args, **kwargs)

    decode.decode_attention = spy
    try:
        out = pa.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="triton")
    finally:
        decode.decode_attention = original
    assert len(calls) == 1
    exact = pa.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                            backend="reference")
    in_dtype = pa.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="reference")
    # the reference computes 16-bit inputs in float32: torch's own bf16 SDPA is the SPEC §8 base
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    base = max((torch_bf16.double() - exact).abs().max().item(),
               (in_dtype.double() - exact).abs().max().item())
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-5, f"max error {err} > 2 * {base} + 1e-5"
