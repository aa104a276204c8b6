"""Suites -> cases: the shapes and options each benchmark runs, and the tensors of one case.

A `Case` is one problem (shapes, options, dtype, device); the runner times it for every provider
and every mode. SDPA cases have one stream; peer cases have 2-4 streams of different lengths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .mmdit import mmdit_cases  # SD3 / Flux / Wan I2V attention shapes (bench/mmdit.py)

SUITES = ("sdpa", "peer", "memory", "overhead", "variants", "mmdit", "decode")
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_ALIASES = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd",
                "fwd_bwd": "fwd+bwd", "both": "fwd+bwd"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

TOKENS_PER_BATCH = 16 * 1024   # SDPA suite: batch * seq_len is fixed, as in FlashAttention's bench
HIDDEN = 2048                  # SDPA suite: query heads * head dim is fixed


@dataclass(frozen=True)
class Case:
    suite: str
    family: str                         # the case without its lengths (one plot line group)
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    q_lens: Tuple[int, ...]
    kv_lens: Tuple[int, ...]
    dtype: str = "float16"
    device: str = "cpu"
    kind: str = "sdpa"                  # "sdpa" (one stream, drop-in API) or "peer"
    is_causal: bool = False
    mask: Optional[str] = None          # sdpa: None | "bool" (key padding) | "float" (additive L x S)
    dropout_p: float = 0.0
    peers: Optional[Tuple[Tuple[bool, ...], ...]] = None   # peer: None = dense
    gate: bool = False
    bias: bool = False
    kv_padding: bool = False            # peer: kv_lengths marks the last eighth of each key stream
    normalize: str = "joint"
    seed: int = 0

    @property
    def num_streams(self) -> int:
        return len(self.q_lens)

    @property
    def seq_len(self) -> int:
        """The x axis of the plots: the longest stream."""
        return max(self.q_lens)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def peer_table(self) -> List[List[bool]]:
        n = self.num_streams
        if self.peers is None:
            return [[True] * n for _ in range(n)]
        return [list(row) for row in self.peers]

    def attended_pairs(self) -> List[Tuple[int, int]]:
        table = self.peer_table()
        return [(s, p) for s in range(self.num_streams) for p in range(self.num_streams) if table[s][p]]

    @property
    def case_id(self) -> str:
        lens = "x".join(str(n) for n in self.q_lens)
        if self.kv_lens != self.q_lens:
            lens += "-kv" + "x".join(str(n) for n in self.kv_lens)
        return f"{self.suite}/{self.family}/B{self.batch}/L{lens}/{self.dtype}"

    def scaled(self, max_tokens: int) -> "Case":
        """The same options on shorter streams and batch 1 (for checks against the reference)."""
        longest = max(max(self.q_lens), max(self.kv_lens))
        factor = max(1, -(-longest // max_tokens))
        shrink = lambda lens: tuple(max(1, n // factor) for n in lens)  # noqa: E731
        return dataclasses.replace(self, batch=1, q_lens=shrink(self.q_lens), kv_lens=shrink(self.kv_lens))


def family_name(**opts) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items() if v not in (None, False, 0, 0.0))


# ---- suites -------------------------------------------------------------------------------

def _sdpa_case(suite, seq_len, head_dim, dtype, device, tokens, hidden, gqa=1, **opts) -> Case:
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
            cases += [_sdpa_case("sdpa", n, head_dim, dtype, device, tokens, hidden, is_causal=causal) for n in lens]
    variants = [dict(gqa=4, is_causal=True), dict(mask="bool"), dict(mask="float"), dict(dropout_p=0.1)]
    for opts in variants:  # --quick: one length each (they show features, not a trend)
        cases += [_sdpa_case("sdpa", n, main_dim, dtype, device, tokens, hidden, **opts)
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


def _variants_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    from .variants import variants_suite  # bench/variants.py imports this module
    return variants_suite(dtype, device, quick)


def _decode_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    from .decode import decode_suite  # bench/decode.py imports this module
    return decode_suite(dtype, device, quick)


SUITE_BUILDERS = {"sdpa": sdpa_suite, "peer": peer_suite, "memory": memory_suite, "overhead": overhead_suite,
                  "variants": _variants_suite, "mmdit": mmdit_cases, "decode": _decode_suite}


def build_cases(suites, dtypes, device: str, quick: bool) -> List[Case]:
    cases = []
    for suite in suites:
        for dtype in dtypes:
            cases += SUITE_BUILDERS[suite](dtype, device, quick)
    return cases


# ---- tensors ------------------------------------------------------------------------------

@dataclass
class Inputs:
    """The tensors of one case; for SDPA cases the lists hold one tensor each."""
    queries: List[torch.Tensor]
    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    attn_mask: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None         # (1, S, S, Hq, Ev): broadcast over the batch
    bias: Optional[torch.Tensor] = None         # (1, S, S, Hq)
    kv_lengths: Optional[torch.Tensor] = None   # (B, S) int64
    grad_outputs: List[torch.Tensor] = field(default_factory=list)

    def differentiable(self) -> List[torch.Tensor]:
        """The tensors whose gradients the backward computes (and the check compares)."""
        extra = [t for t in (self.gate, self.bias) if t is not None]
        return self.queries + self.keys + self.values + extra

    def converted(self, dtype: torch.dtype, requires_grad: bool) -> "Inputs":
        """A copy in `dtype` (floating tensors only), as fresh leaves."""
        def cast(t):
            if t is None or not t.is_floating_point():
                return t
            return t.detach().to(dtype).requires_grad_(requires_grad)
        mask = self.attn_mask if self.attn_mask is None or self.attn_mask.dtype == torch.bool \
            else self.attn_mask.detach().to(dtype)
        return Inputs([cast(t) for t in self.queries], [cast(t) for t in self.keys],
                      [cast(t) for t in self.values], mask, cast(self.gate), cast(self.bias),
                      self.kv_lengths, [g.to(dtype) for g in self.grad_outputs])


def make_inputs(case: Case, requires_grad: bool = False) -> Inputs:
    """Random tensors for `case` (seeded, so every provider sees the same numbers)."""
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    dtype, device = case.torch_dtype, torch.device(case.device)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    b, hq, h = case.batch, case.q_heads, case.kv_heads
    queries = [rand(b, hq, n, case.head_dim) for n in case.q_lens]
    keys = [rand(b, h, n, case.head_dim) for n in case.kv_lens]
    values = [rand(b, h, n, case.value_dim) for n in case.kv_lens]
    inputs = Inputs(queries, keys, values)
    s = case.num_streams
    if case.mask == "bool":  # key padding: batch element i masks its last i/(2B) share of keys
        kv = case.kv_lens[0]
        keep = torch.arange(kv)[None, :] < torch.tensor([kv - (kv * i) // (2 * b) for i in range(b)])[:, None]
        inputs.attn_mask = keep[:, None, None, :].to(device)
    elif case.mask == "float":  # an ALiBi-like additive distance penalty, broadcast over B and H
        q_pos = torch.arange(case.q_lens[0])[:, None]
        k_pos = torch.arange(case.kv_lens[0])[None, :]
        inputs.attn_mask = (-(q_pos - k_pos).abs().float() / 64.0)[None, None].to(device=device, dtype=dtype)
    if case.gate:
        gate = torch.sigmoid(torch.randn(1, s, s, hq, case.value_dim, generator=gen))
        inputs.gate = gate.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    if case.bias:
        inputs.bias = rand(1, s, s, hq, scale=0.5)
    if case.kv_padding:
        lens = torch.tensor([[max(1, n - n // 8) for n in case.kv_lens]] * b, dtype=torch.int64)
        inputs.kv_lengths = lens.to(device)
    inputs.grad_outputs = [torch.randn(b, hq, n, case.value_dim, generator=gen).to(device=device, dtype=dtype)
                           for n in case.q_lens]
    return inputs
