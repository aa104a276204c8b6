"""The types every bench module shares: a case and its tensors, a provider and the ways it declines,
the run settings. The bottom of bench/'s module graph: it imports no other bench module but timing.
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from .timing import TimingSettings

MODES = ("fwd", "bwd", "fwd+bwd")
MODE_ALIASES = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd",
                "fwd_bwd": "fwd+bwd", "both": "fwd+bwd"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

TOKENS_PER_BATCH = 16 * 1024   # SDPA suite: batch * seq_len is fixed, as in FlashAttention's bench
HIDDEN = 2048                  # SDPA suite: query heads * head dim is fixed


BACKWARD_MODES = ("bwd", "fwd+bwd")


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


# ---- providers -----------------------------------------------------------------------------

class Unavailable(Exception):
    """The provider cannot run on this machine at all."""


class Unsupported(NotImplementedError):
    """The provider cannot run this case (a feature it lacks)."""


Built = Tuple[Callable[[], List[torch.Tensor]], str]  # (function, note)


@dataclass
class Provider:
    name: str
    package: bool                       # part of peer_attention (speed-ups are against the others)
    kinds: Tuple[str, ...]              # case kinds it applies to ("sdpa", "peer")
    build: Callable[[Case, Inputs], Built]
    materializes_scores: bool = False   # holds the L x M scores: skipped when they cannot fit
    default: bool = True                # in the default provider list (else only when named)


class Skipped(Exception):
    pass


# ---- running -------------------------------------------------------------------------------

@dataclass
class RunSettings:
    timing: TimingSettings = field(default_factory=TimingSettings)
    overhead_calls: int = 100
    overhead_samples: int = 41


def release(device: str) -> None:
    if device == "cuda":  # free the last provider's memory before the next one is measured
        gc.collect()      # (on the CPU nothing is measured and a collection per row costs seconds)
        torch.cuda.empty_cache()
