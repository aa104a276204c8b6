"""Presets: a fixed case list, providers and modes for one purpose.

  headline   the numbers the README reports (issue 10): SDPA at 16k tokens per batch, head dim
             128, L = 1k ... 16k, causal and not; head dims 64 and 256 at L = 8k; peer attention
             with 3 streams x 4k tokens, gates + bias, joint and per-peer normalisation, and plain
             SDPA on the same total work (one 12k stream); bf16; fwd and fwd+bwd; this package's
             kernels against torch's cuDNN / flash / efficient SDPA, FlexAttention, the
             compositions and FlashAttention-4 (flash_attn.cute) when importable. Meant to take
             under 6 minutes on an H100, autotuning included (FlexAttention compiles per shape, so
             it runs on a subset of the cases; the others say so).
  gpucheck   the bench step of scripts/gpu_check.sh (issue 18), about 2.5 minutes on an H100/H200:
             the headline's core at L = 8k and 16k only (SDPA head dim 128, causal and not; peer
             attention 3 x 4k, gates + bias, joint; the same work as one 12k stream), bf16, fwd
             and fwd+bwd, the headline's providers plus pa.torch (what auto's order per device
             kind is set from); FlexAttention at L = 16k only.
  cpu        the CPU targets of issue 9 (`python -m bench --preset cpu`, a few minutes on 2
             cores): the drop-in (auto, i.e. the `torch` backend, and pa.torch) against torch's
             own CPU SDPA at (B, H, L, E) = (12, 3, 1030, 16), float32 and bfloat16, target
             >= 0.95x; peer attention with 3 streams x 1024 tokens (B 2, 4 heads, E 32, gates,
             joint + bias + causal, and per-peer) against the reference, target >= 3x, and the
             compositions; and (issue 20) peer attention through auto against the composition a
             user writes without this package (compose.packed: torch.cat + one SDPA + split;
             compose.concat: one SDPA per query stream over concatenated keys; compose.pairs: SDPA
             per pair + gated sum for the per-peer softmax), target >= 1.0x, at MMDiT-like (154 +
             1024 tokens, 4 heads x 64), SD3-like (333 + 4096) and Wan-like (video over text +
             image, per-peer) shapes and at tiny ones, with the `torch` backend's two plans
             (pa.torch.pairs, pa.torch.fused) timed beside it. fwd and fwd+bwd. The providers of a
             case are timed in alternation (round after round, in shuffled order, medians), so
             that the load of a shared machine weighs on all of them alike.

`--quick` shrinks a preset's shapes (headline: lengths / 128, head dims / 4; cpu: lengths / 8)
for a smoke run on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .cases import sdpa_case
from .common import HIDDEN, TOKENS_PER_BATCH, Case

HEADLINE_LENGTHS = (1024, 2048, 4096, 8192, 16384)
HEADLINE_PROVIDERS = ("pa.triton", "pa.cuda", "torch.cudnn", "torch.flash", "torch.efficient",
                      "flex", "compose.pairs", "compose.concat", "fa4")
HEADLINE_MODES = ("fwd", "fwd+bwd")
PEER_STREAMS, PEER_TOKENS, PEER_HEADS = 3, 4096, 16
FLEX_SDPA_LENGTHS = (4096, 16384)  # FlexAttention compiles per shape: E = 128 at these L only


def _shrink(quick: bool):
    if not quick:
        return lambda n: n, lambda e: e, TOKENS_PER_BATCH, HIDDEN
    return lambda n: max(8, n // 128), lambda e: max(8, e // 4), TOKENS_PER_BATCH // 128, HIDDEN // 4


def headline_cases(dtype: str, device: str, quick: bool = False) -> List[Case]:
    length, dim, tokens, hidden = _shrink(quick)
    cases = []
    for causal in (False, True):
        cases += [sdpa_case("headline", length(n), dim(128), dtype, device, tokens, hidden,
                             is_causal=causal) for n in HEADLINE_LENGTHS]
    for head_dim in (64, 256):
        for causal in (False, True):
            cases.append(sdpa_case("headline", length(8192), dim(head_dim), dtype, device, tokens,
                                    hidden, is_causal=causal))
    streams = (length(PEER_TOKENS),) * PEER_STREAMS
    heads, peer_dim = PEER_HEADS if not quick else 2, dim(128)
    for normalize in ("joint", "peer"):
        cases.append(Case("headline", f"S{PEER_STREAMS},{normalize},gate,bias,E={peer_dim}", 1, heads,
                          heads, peer_dim, peer_dim, streams, streams, dtype, device, "peer",
                          gate=True, bias=True, normalize=normalize))
    total = sum(streams)  # plain SDPA on the same work as the dense 3-stream problem
    cases.append(Case("headline", f"E={peer_dim},same work as S{PEER_STREAMS}", 1, heads, heads,
                      peer_dim, peer_dim, (total,), (total,), dtype, device, "sdpa"))
    return cases


def flex_runs(case: Case, quick: bool) -> bool:
    """Whether FlexAttention runs this headline case (each new shape costs a compile)."""
    if case.kind == "peer" or "same work" in case.family:
        return True
    length, dim, _, _ = _shrink(quick)
    return case.head_dim == dim(128) and case.seq_len in {length(n) for n in FLEX_SDPA_LENGTHS}


GPU_CHECK_LENGTHS = (8192, 16384)
GPU_CHECK_PROVIDERS = HEADLINE_PROVIDERS[:2] + ("pa.torch",) + HEADLINE_PROVIDERS[2:]


def gpu_check_cases(dtype: str, device: str, quick: bool = False) -> List[Case]:
    """The headline's cases at the GPU check's lengths (no head dims 64/256, no per-peer case),
    the most telling first, since results are written case by case and the step is time-boxed:
    SDPA at 16k, peer attention, causal SDPA at 16k, then 8k, then the same-work SDPA."""
    length, dim = _shrink(quick)[:2]
    longest, shorter = length(GPU_CHECK_LENGTHS[1]), length(GPU_CHECK_LENGTHS[0])

    def rank(c: Case) -> int:
        if "same work" in c.family:
            return 5
        if c.kind == "peer":
            return 1 if c.normalize == "joint" else -1
        if c.head_dim != dim(128) or c.seq_len not in (longest, shorter):
            return -1
        return {(longest, False): 0, (longest, True): 2, (shorter, False): 3,
                (shorter, True): 4}[(c.seq_len, c.is_causal)]
    ranked = [(rank(c), i, c) for i, c in enumerate(headline_cases(dtype, device, quick))]
    return [c for r, _, c in sorted(ranked, key=lambda t: t[:2]) if r >= 0]


def gpu_check_flex_runs(case: Case, quick: bool) -> bool:
    """FlexAttention (a compile per shape) at the longest SDPA length only."""
    return case.kind == "sdpa" and "same work" not in case.family and \
        case.seq_len == _shrink(quick)[0](GPU_CHECK_LENGTHS[-1])


CPU_PROVIDERS = ("pa.auto", "pa.torch", "pa.torch.pairs", "pa.torch.fused", "pa.reference",
                 "torch.sdpa", "torch.flash", "compose.pairs", "compose.concat", "compose.packed")
CPU_DROPIN = (12, 3, 1030, 16)                     # (B, H, L, E) of issue 9's measurement
CPU_PEER = (2, 4, (1024, 1024, 1024), 32)         # (B, H, stream lengths, E)
DROPIN_TARGET, PEER_TARGET, COMPOSITION_TARGET = 0.95, 3.0, 1.0
ISSUE9_PEER_PREFIX = "S3,"  # the reference is the baseline of these peer cases only
_WAN_PEERS = ((False, True, True), (False, False, False), (False, False, False))
# issue 20's cases against the compositions: (family, B, H, E, q lens, kv lens, options, tiny)
CPU_COMPOSITION = [
    ("mmdit,joint", 1, 4, 64, (154, 1024), (154, 1024), {}, False),
    ("sd3,joint", 1, 4, 64, (333, 4096), (333, 4096), {}, False),
    ("mmdit,joint,gate", 1, 4, 64, (154, 1024), (154, 1024), dict(gate=True), False),
    ("wan,video->text+image,peer", 1, 4, 64, (1024, 0, 0), (0, 154, 257),
     dict(peers=_WAN_PEERS, normalize="peer"), False),
    ("tiny,S2,joint", 4, 2, 16, (32, 16), (32, 16), {}, True),
    ("tiny,S3,joint,gate,bias,causal", 4, 2, 16, (32, 16, 8), (32, 16, 8),
     dict(gate=True, bias=True, is_causal=True), True),
    ("tiny,S3,peer,gate", 4, 2, 16, (32, 16, 8), (32, 16, 8), dict(gate=True, normalize="peer"),
     True),
]


def cpu_cases(dtype: str, device: str, quick: bool = False) -> List[Case]:
    """Issue 9's CPU cases: the drop-in in every dtype; peer attention in float32."""
    shrink = (lambda n: max(8, n // 8)) if quick else (lambda n: n)
    batch, heads, length, dim = CPU_DROPIN
    cases = [Case("cpu", f"dropin,E={dim}", batch, heads, heads, dim, dim, (shrink(length),),
                  (shrink(length),), dtype, device, "sdpa")]
    if dtype != "float32":
        return cases
    batch, heads, lens, dim = CPU_PEER
    lens = tuple(shrink(n) for n in lens)
    cases.append(Case("cpu", f"S3,joint,gate,bias,causal,E={dim}", batch, heads, heads, dim, dim,
                      lens, lens, dtype, device, "peer", gate=True, bias=True, is_causal=True))
    cases.append(Case("cpu", f"S3,peer,gate,E={dim}", batch, heads, heads, dim, dim, lens, lens,
                      dtype, device, "peer", gate=True, normalize="peer"))
    for family, batch, heads, dim, q_lens, kv_lens, opts, tiny in CPU_COMPOSITION:
        size = (lambda n: n) if tiny else shrink
        cases.append(Case("cpu", f"{family},E={dim}", batch, heads, heads, dim, dim,
                          tuple(size(n) if n else 0 for n in q_lens),
                          tuple(size(n) if n else 0 for n in kv_lens), dtype, device, "peer", **opts))
    return cases


def cpu_runs(case: Case, provider: str) -> bool:
    """The reference runs issue 9's peer cases only (it is the baseline there, not on SDPA nor on
    the cases against the compositions)."""
    return provider != "pa.reference" or (case.kind == "peer"
                                          and case.family.startswith(ISSUE9_PEER_PREFIX))


@dataclass(frozen=True)
class Preset:
    cases: Callable[..., List[Case]]    # (dtype, device, quick) -> cases
    providers: Tuple[str, ...]
    modes: Tuple[str, ...]
    dtypes: Dict[str, str]              # device type -> default dtype list
    interleave: bool = False            # time a case's providers in alternation
    flex_runs: Optional[Callable[[Case, bool], bool]] = None  # (case, quick): flex runs it


PRESETS: Dict[str, Preset] = {
    "headline": Preset(headline_cases, HEADLINE_PROVIDERS, HEADLINE_MODES,
                       {"cuda": "bfloat16", "cpu": "float32"}, flex_runs=flex_runs),
    "gpucheck": Preset(gpu_check_cases, GPU_CHECK_PROVIDERS, HEADLINE_MODES,
                       {"cuda": "bfloat16", "cpu": "float32"}, flex_runs=gpu_check_flex_runs),
    "cpu": Preset(cpu_cases, CPU_PROVIDERS, ("fwd", "fwd+bwd"),
                  {"cuda": "float32,bfloat16", "cpu": "float32,bfloat16"}, interleave=True),
}
