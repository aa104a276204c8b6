"""Suites -> cases: the shapes and options each benchmark runs.

A `Case` (bench/common.py) is one problem (shapes, options, dtype, device); the runner times it for
every provider and every mode. SDPA cases have one stream; peer cases have 2-4 streams of different
lengths. The variants, mmdit and decode suites are built by their own modules.
"""
from __future__ import annotations

from typing import List, Tuple

from .common import HIDDEN, TOKENS_PER_BATCH, Case, family_name
from .decode import decode_suite  # one decode step over a KV cache (bench/decode.py)
from .mmdit import mmdit_cases  # SD3 / Flux / Wan I2V attention shapes (bench/mmdit.py)
from .variants import variants_suite  # sliding window, softcap, ALiBi, sinks, varlen (bench/variants.py)


# ---- suites -------------------------------------------------------------------------------

def sdpa_case(suite, seq_len, head_dim, dtype, device, tokens, hidden, gqa=1, **opts) -> Case:
    q_heads = max(1, hidden // head_dim)
    kv_heads = max(1, q_heads // gqa)
    fam = family_name(E=head_dim, causal=opts.get("is_causal"), gqa=f"{q_heads}/{kv_heads}" if gqa > 1 else None,
                      mask=opts.get("mask"), dropout=opts.get("dropout_p"))
    return Case(suite, fam, max(1, tokens // seq_len), q_heads, kv_heads, head_dim, head_dim,
                (seq_len,), (seq_len,), dtype, device, "sdpa", **opts)


def sdpa_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    """Causal and non-causal, E in {64,128,256}, L = 512..16k at 16k tokens per batch; then GQA,
    bool/float masks and dropout at E = 128."""
    if quick:
        lens, head_dims, tokens, hidden, main_dim = (32, 64), (16, 32), 128, 64, 16
    else:
        lens, head_dims, tokens, hidden, main_dim = (512, 1024, 2048, 4096, 8192, 16384), (64, 128, 256), \
            TOKENS_PER_BATCH, HIDDEN, 128
    cases = []
    for head_dim in head_dims:
        for causal in (False, True):
            cases += [sdpa_case("sdpa", n, head_dim, dtype, device, tokens, hidden, is_causal=causal) for n in lens]
    variants = [dict(gqa=4, is_causal=True), dict(mask="bool"), dict(mask="float"), dict(dropout_p=0.1)]
    for opts in variants:  # --quick: one length each (they show features, not a trend)
        cases += [sdpa_case("sdpa", n, main_dim, dtype, device, tokens, hidden, **opts)
                  for n in (lens[-1:] if quick else lens)]
    return cases


def _split(longest: int, shares: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(max(1, longest // d) for d in shares)


PEER_CONFIGS = [
    # (family, stream length divisors, peers, options)
    ("S2,dense,joint", (1, 2), None, dict()),
    ("S3,dense,joint,gate,bias,causal", (1, 2, 4), None, dict(gate=True, bias=True, is_causal=True)),
    ("S3,dense,peer,gate", (1, 2, 4), None, dict(gate=True, normalize="peer")),
    ("S4,sparse,joint,bias,kv_lengths", (1, 2, 4, 4),
     ((1, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 1), (1, 0, 0, 1)), dict(bias=True, kv_padding=True)),
    ("S4,sparse,peer,gate", (1, 2, 4, 4),
     ((1, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 1), (1, 0, 0, 1)), dict(gate=True, normalize="peer")),
]


def peer_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    """2-4 streams of different lengths (longest L, others L/2, L/4), dense and sparse peer
    tables, joint and per-peer normalisation, gates, bias, causal self pairs, kv_lengths."""
    if quick:
        lens, heads, head_dim, tokens = (32, 64), 2, 16, 128
    else:
        lens, heads, head_dim, tokens = (512, 1024, 2048, 4096, 8192, 16384), 16, 64, TOKENS_PER_BATCH
    cases = []
    for family, shares, peers, opts in PEER_CONFIGS:
        for n in lens:
            stream_lens = _split(n, shares)
            peer_rows = None if peers is None else tuple(tuple(bool(x) for x in row) for row in peers)
            cases.append(Case("peer", family, max(1, tokens // n), heads, heads, head_dim, head_dim,
                              stream_lens, stream_lens, dtype, device, "peer", peers=peer_rows, **opts))
    return cases


def memory_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    """Peak memory against sequence length: batch 1, fixed heads, growing L."""
    if quick:
        lens, heads, head_dim = (32, 64, 128), 2, 16
    else:
        lens, heads, head_dim = (1024, 2048, 4096, 8192, 16384), 16, 128
    cases = []
    for n in lens:
        cases.append(Case("memory", family_name(E=head_dim, causal=True), 1, heads, heads, head_dim, head_dim,
                          (n,), (n,), dtype, device, "sdpa", is_causal=True))
        cases.append(Case("memory", f"S3,joint,gate,E={head_dim}", 1, heads, heads, head_dim, head_dim,
                          _split(n, (1, 2, 4)), _split(n, (1, 2, 4)), dtype, device, "peer", gate=True))
    return cases


def overhead_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    """Tiny shapes, where a call's cost is mostly Python: the drop-in and a 2-stream peer call."""
    return [
        Case("overhead", "sdpa,tiny", 1, 2, 2, 16, 16, (16,), (16,), dtype, device, "sdpa"),
        Case("overhead", "peer,S2,gate,bias", 1, 2, 2, 16, 16, (8, 16), (8, 16), dtype, device, "peer",
             gate=True, bias=True),
    ]


SUITE_BUILDERS = {"sdpa": sdpa_suite, "peer": peer_suite, "memory": memory_suite, "overhead": overhead_suite,
                  "variants": variants_suite, "mmdit": mmdit_cases, "decode": decode_suite}
SUITES = tuple(SUITE_BUILDERS)


def build_cases(suites, dtypes, device: str, quick: bool) -> List[Case]:
    cases = []
    for suite in suites:
        for dtype in dtypes:
            cases += SUITE_BUILDERS[suite](dtype, device, quick)
    return cases


