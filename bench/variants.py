"""The `variants` suite (SPEC section 9): sliding window, softcap, ALiBi, sinks and varlen documents.

    python -m bench --suite variants            # GPU: 16k tokens per batch
    python -m bench --suite variants --quick    # tiny shapes, any machine

Every case is a flash-attn style call (q (B, L, Hq, E), causal aligned bottom-right) or, for
"varlen", a packed batch of documents whose lengths are drawn from a long-tailed (log-normal)
distribution and sum to the batch's tokens. Providers:

  pa.NAME                 flash_attn_func / flash_attn_varlen_func with backend=NAME
  torch.flash/efficient/cudnn/math
                          torch SDPA with the equivalent additive mask (band, ALiBi, document
                          blocks; a sink is one more key with a zero value whose mask entry is the
                          sink logit); softcap has no SDPA equivalent
  flex                    FlexAttention: block mask for band/documents, score_mod for softcap and
                          ALiBi, sinks as out * sigmoid(lse - sink)
  flash_attn4 / flash_attn2
                          flash-attn's own functions, when importable

Each provider is checked against peer_attention's reference (float64) before it is timed, on the
case itself or, when the scores would be too big, on the same options at shorter lengths.
TFLOP/s are dense-equivalent for windows (the band is not subtracted); varlen counts each
document's own (causal) square only.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import peer_attention as pa

from .check import outputs_and_grads
from .common import (BACKWARD_MODES, DTYPES, TOKENS_PER_BATCH, Built, Case, Provider, Unavailable,
                     Unsupported, family_name, release)
from .providers import PACKAGE_BACKENDS, all_providers, flex_fn
from .rows import add_speedups, run_provider

SUITE = "variants"
CHECK_MAX_SCORES = 1 << 22
CHECK_MAX_TOKENS = 256


@dataclass(frozen=True)
class VariantCase(Case):
    """A Case with the section 9 options. kind "sdpa": one sequence per batch entry; kind
    "varlen": batch 1 packed with documents of lengths q_lens (== kv_lens)."""
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    sinks: bool = False

    @property
    def varlen(self) -> bool:
        return self.kind == "varlen"

    def peer_table(self) -> List[List[bool]]:
        n = self.num_streams
        return [[s == p for p in range(n)] for s in range(n)]

    def attended_pairs(self) -> List[Tuple[int, int]]:
        return [(s, s) for s in range(self.num_streams)]

    @property
    def case_id(self) -> str:
        if not self.varlen:
            return super().case_id
        return f"{self.suite}/{self.family}/docs{self.num_streams}/T{sum(self.q_lens)}/{self.dtype}"

    @property
    def seq_len(self) -> int:
        return sum(self.q_lens) if self.varlen else max(self.q_lens)

    def scaled(self, max_tokens: int) -> "VariantCase":
        """Shorter, batch 1, the window shrunk in step (so that it still bands)."""
        longest = sum(self.q_lens) if self.varlen else max(self.q_lens)
        factor = max(1, -(-longest // max_tokens))
        if self.varlen:
            lens = document_lengths(max(8, longest // factor), self.seed)
            lens_q = lens_k = lens
        else:
            lens_q = tuple(max(1, n // factor) for n in self.q_lens)
            lens_k = tuple(max(1, n // factor) for n in self.kv_lens)
        window = tuple(w if w < 0 else max(1, w // factor) for w in self.window)
        return dataclasses.replace(self, batch=1, q_lens=lens_q, kv_lens=lens_k, window=window)


def document_lengths(total: int, seed: int, min_len: int = 4) -> Tuple[int, ...]:
    """Long-tailed document lengths summing to `total`: log-normal draws (median total/64, a
    heavy right tail), the last document cut to fit."""
    gen = torch.Generator().manual_seed(1000 + seed)
    median = max(min_len, total // 64)
    lens: List[int] = []
    left = total
    while left > 0:
        draw = float(torch.exp(torch.randn((), generator=gen) * 1.2)) * median
        n = min(left, max(min_len, int(draw)))
        if 0 < left - n < min_len:  # no crumb at the end
            n = left
        lens.append(n)
        left -= n
    return tuple(lens)


# ---- the suite -----------------------------------------------------------------------------

FAMILIES = [
    # (name, options); lengths come from the suite
    ("window,causal", dict(is_causal=True, window="window")),
    ("softcap=30,causal", dict(is_causal=True, softcap=30.0)),
    ("alibi,causal", dict(is_causal=True, alibi=True)),
    ("sinks,causal", dict(is_causal=True, sinks=True)),
    ("sinks,window,causal", dict(is_causal=True, sinks=True, window="window")),
]


def variants_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    """Window 4k at 16k tokens, softcap, ALiBi, sinks (with and without a window) at 16k tokens
    per batch, GQA 4:1, E = 128; varlen: one packed batch of long-tailed documents."""
    if quick:
        lens, window, heads, kv_heads, head_dim, tokens = (48,), 16, 2, 1, 16, 96
    else:
        lens, window, heads, kv_heads, head_dim, tokens = (4096, 16384), 4096, 16, 4, 128, \
            TOKENS_PER_BATCH
    cases: List[Case] = []
    for name, opts in FAMILIES:
        opts = dict(opts)
        if opts.pop("window", None):
            opts["window"] = (window - 1, 0)
            name = name.replace("window", f"window={window}")
        for n in lens:
            if "window" in opts and n <= window:
                continue  # a window as long as the sequence is plain causal
            cases.append(VariantCase(SUITE, name, max(1, tokens // n), heads, kv_heads, head_dim,
                                     head_dim, (n,), (n,), dtype, device, "sdpa", **opts))
    docs = document_lengths(tokens, seed=0)
    for name, opts in (("varlen,causal", dict(is_causal=True)),
                       (f"varlen,window={window},causal", dict(is_causal=True, window=(window - 1, 0)))):
        if quick and "window" in name:
            continue
        cases.append(VariantCase(SUITE, name, 1, heads, kv_heads, head_dim, head_dim, docs, docs,
                                 dtype, device, "varlen", **opts))
    return cases


# ---- tensors -------------------------------------------------------------------------------

@dataclass
class VariantInputs:
    """q (B, L, Hq, E) ... in flash layout; varlen: (total, H, E) and int32 cu_seqlens."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sinks: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    grad_outputs: List[torch.Tensor] = dataclasses.field(default_factory=list)

    def differentiable(self) -> List[torch.Tensor]:
        return [self.q, self.k, self.v] + ([self.sinks] if self.sinks is not None else [])

    def converted(self, dtype: torch.dtype, requires_grad: bool) -> "VariantInputs":
        def cast(t):
            return None if t is None else t.detach().to(dtype).requires_grad_(requires_grad)
        return VariantInputs(cast(self.q), cast(self.k), cast(self.v), cast(self.sinks),
                             self.alibi_slopes, self.cu_seqlens,
                             [g.to(dtype) for g in self.grad_outputs])


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes 2^(-8 h / H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def make_variant_inputs(case: VariantCase, requires_grad: bool = False) -> VariantInputs:
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    dtype, device = DTYPES[case.dtype], torch.device(case.device)

    def rand(*shape, grad=requires_grad):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    if case.varlen:
        total = sum(case.q_lens)
        q, k, v = (rand(total, case.q_heads, case.head_dim), rand(total, case.kv_heads, case.head_dim),
                   rand(total, case.kv_heads, case.value_dim))
        offsets = [0]
        for n in case.q_lens:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        out_shape = (total, case.q_heads, case.value_dim)
    else:
        b, n, m = case.batch, case.q_lens[0], case.kv_lens[0]
        q, k, v = (rand(b, n, case.q_heads, case.head_dim), rand(b, m, case.kv_heads, case.head_dim),
                   rand(b, m, case.kv_heads, case.value_dim))
        cu = None
        out_shape = (b, n, case.q_heads, case.value_dim)
    sinks = rand(case.q_heads) if case.sinks else None
    slopes = alibi_slopes(case.q_heads).to(device) if case.alibi else None
    grad_out = torch.randn(*out_shape, generator=gen).to(device=device, dtype=dtype)
    return VariantInputs(q, k, v, sinks, slopes, cu, [grad_out])


# ---- providers -----------------------------------------------------------------------------

def _flash_kwargs(case: VariantCase, x: VariantInputs) -> dict:
    return dict(causal=case.is_causal, window_size=case.window, softcap=case.softcap,
                alibi_slopes=x.alibi_slopes)


def _package(backend: str) -> Provider:
    def build(case: VariantCase, x: VariantInputs) -> Built:
        reason = pa.available_backends().get(backend)
        if reason:
            raise Unavailable(reason)
        kwargs = dict(_flash_kwargs(case, x), sinks=x.sinks, backend=backend)
        if case.varlen:
            longest = max(case.q_lens)

            def run():
                return [pa.flash_attn_varlen_func(x.q, x.k, x.v, x.cu_seqlens, x.cu_seqlens,
                                                  longest, longest, **kwargs)]
        else:
            def run():
                return [pa.flash_attn_func(x.q, x.k, x.v, **kwargs)]
        run()  # a backend that declines says why here (NotImplementedError -> "unsupported")
        return run, ""
    return Provider(f"pa.{backend}", True, ("sdpa", "varlen"), build,
                    materializes_scores=(backend == "reference"))


def _allowed_and_bias(case: VariantCase, x: VariantInputs, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Bool (L, S) of the visible keys (band aligned bottom-right; documents for varlen) and the
    ALiBi term (Hq, L, S) or None: the explicit form torch's SDPA and the checks see."""
    if case.varlen:
        doc = torch.repeat_interleave(torch.arange(case.num_streams, device=device),
                                      torch.tensor(case.q_lens, device=device))
        starts = x.cu_seqlens[:-1].long()[doc]
        pos = torch.arange(sum(case.q_lens), device=device) - starts  # position inside its document
        same = doc[:, None] == doc[None, :]
        rel = pos[None, :] - pos[:, None]  # j - i within a document (L_b == S_b: no offset)
    else:
        n, m = case.q_lens[0], case.kv_lens[0]
        same = None
        rel = torch.arange(m, device=device)[None, :] - torch.arange(n, device=device)[:, None] - (m - n)
    left, right = case.window
    if case.is_causal:
        right = 0
    allowed = torch.ones(rel.shape, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    if same is not None:
        allowed &= same
    bias = None
    if x.alibi_slopes is not None:
        bias = -x.alibi_slopes[:, None, None] * rel.abs()[None].float()
    return allowed, bias


def _sdpa_mask_bytes(case: VariantCase) -> int:
    tokens = sum(case.q_lens) if case.varlen else case.q_lens[0]
    heads = case.q_heads if (case.alibi or case.sinks) else 1
    return case.batch * heads * tokens * (tokens + 1) * 4


def _torch_sdpa(label: str, backend_attr: str) -> Provider:
    def build(case: VariantCase, x: VariantInputs) -> Built:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if label in ("efficient", "cudnn", "flash") and x.q.device.type != "cuda":
            raise Unsupported(f"torch SDPA {label} runs on CUDA tensors only")
        if case.softcap > 0:
            raise Unsupported("torch SDPA has no softcap (a tanh of the scores)")
        if label == "flash":
            raise Unsupported("torch SDPA flash takes no attn_mask (band, ALiBi, documents need one)")
        limit = 0.25 * (torch.cuda.get_device_properties(0).total_memory if x.q.device.type == "cuda"
                        else 16 * 2**30)
        if _sdpa_mask_bytes(case) > limit:
            raise Unsupported(f"the explicit mask needs {_sdpa_mask_bytes(case) / 2**30:.1f} GiB")
        backend = getattr(SDPBackend, backend_attr)
        device, dtype = x.q.device, x.q.dtype
        allowed, bias = _allowed_and_bias(case, x, device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
        mask = mask[None, None] if bias is None else (mask + bias.to(dtype))[None]

        def layout(t):  # (B, L, H, E) or (total, H, E) -> (B, H, L, E)
            return (t[None] if case.varlen else t).transpose(1, 2)

        def run():
            q, k, v = layout(x.q), layout(x.k), layout(x.v)
            attn_mask = mask
            if x.sinks is not None:  # one more key: score 0 + mask = the sink, value 0
                k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
                v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
                sink = x.sinks[None, :, None, None].expand(1, -1, mask.shape[2], 1).to(dtype)
                attn_mask = torch.cat([mask.expand(1, case.q_heads, -1, -1), sink], dim=-1)
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                     enable_gqa=case.q_heads != case.kv_heads)
            out = out.transpose(1, 2)
            return [out[0] if case.varlen else out]
        return run, "explicit additive mask"
    return Provider(f"torch.{label}", False, ("sdpa", "varlen"), build, materializes_scores=True)


def _flex(case: VariantCase, x: VariantInputs) -> Built:
    try:
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"FlexAttention needs torch >= 2.5 ({exc})") from None
    device = x.q.device
    if device.type == "cpu" and x.q.requires_grad:
        raise Unsupported("FlexAttention has no backward on the CPU")
    flex = flex_fn(device.type)
    left, right = case.window
    if case.is_causal:
        right = 0
    if case.varlen:
        doc = torch.repeat_interleave(torch.arange(case.num_streams, device=device),
                                      torch.tensor(case.q_lens, device=device))
        start = x.cu_seqlens[:-1].long()[doc]
        offset = 0
    else:
        doc = start = None
        offset = case.kv_lens[0] - case.q_lens[0]

    def rel(qi, ki):  # key minus aligned query position
        return (ki - qi) if doc is None else (ki - start[ki]) - (qi - start[qi])

    def mask_mod(b, h, qi, ki):
        r = rel(qi + offset, ki) if doc is None else rel(qi, ki)
        ok = r == r
        if left >= 0:
            ok = ok & (r >= -left)
        if right >= 0:
            ok = ok & (r <= right)
        if doc is not None:
            ok = ok & (doc[qi] == doc[ki])
        return ok

    tokens_q = sum(case.q_lens) if case.varlen else case.q_lens[0]
    tokens_k = sum(case.kv_lens) if case.varlen else case.kv_lens[0]
    block_mask = create_block_mask(mask_mod, None, None, tokens_q, tokens_k, device=device,
                                   _compile=device.type == "cuda")
    softcap, slopes = case.softcap, x.alibi_slopes

    def score_mod(score, b, h, qi, ki):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            r = rel(qi + offset, ki) if doc is None else rel(qi, ki)
            score = score - slopes[h] * r.abs()
        return score

    use_score_mod = softcap > 0 or slopes is not None

    def layout(t):
        return (t[None] if case.varlen else t).transpose(1, 2)

    def run():
        q, k, v = layout(x.q), layout(x.k), layout(x.v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, aux = flex(q, k, v, score_mod=score_mod if use_score_mod else None,
                            block_mask=block_mask, enable_gqa=case.q_heads != case.kv_heads,
                            return_aux=AuxRequest(lse=True))
        if x.sinks is not None:  # the sink's share of the normaliser, taken out afterwards
            out = out * torch.sigmoid(aux.lse - x.sinks[None, :, None].to(aux.lse.dtype))[..., None].to(out.dtype)
        out = out.transpose(1, 2)
        return [out[0] if case.varlen else out]

    note = "block mask + score_mod" + ("; sinks as out * sigmoid(lse - sink)" if x.sinks is not None else "")
    if device.type != "cuda":
        note += "; eager, not compiled (CPU)"
    return run, note


def _flash_attn_package(label: str, module: str) -> Provider:
    def build(case: VariantCase, x: VariantInputs) -> Built:
        try:
            lib = __import__(module, fromlist=["flash_attn_func"])
        except Exception as exc:  # ImportError, or a CUDA library mismatch at import
            raise Unavailable(f"{module} not importable ({type(exc).__name__})") from None
        if x.q.device.type != "cuda":
            raise Unsupported(f"{label} runs on CUDA tensors only")
        if case.alibi and label == "flash_attn4":
            raise Unsupported("flash_attn4 has no ALiBi")
        if case.sinks and label == "flash_attn2":
            raise Unsupported("flash_attn2 has no attention sinks")
        kwargs = dict(causal=case.is_causal, window_size=case.window, softcap=case.softcap)
        if case.alibi:
            kwargs["alibi_slopes"] = x.alibi_slopes
        if case.sinks:
            kwargs["learnable_sink"] = x.sinks

        def first(result):
            return result[0] if isinstance(result, tuple) else result

        if case.varlen:
            longest = max(case.q_lens)

            def run():
                return [first(lib.flash_attn_varlen_func(
                    x.q, x.k, x.v, cu_seqlens_q=x.cu_seqlens, cu_seqlens_k=x.cu_seqlens,
                    max_seqlen_q=longest, max_seqlen_k=longest, **kwargs))]
        else:
            def run():
                return [first(lib.flash_attn_func(x.q, x.k, x.v, **kwargs))]
        return run, ""
    return Provider(label, False, ("sdpa", "varlen"), build)


def variant_providers() -> Dict[str, Provider]:
    providers = [_package(name) for name in PACKAGE_BACKENDS]
    providers += [_torch_sdpa(label, attr) for label, attr in (
        ("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
        ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH"))]
    providers += [Provider("flex", False, ("sdpa", "varlen"), _flex),
                  _flash_attn_package("flash_attn4", "flash_attn.cute"),
                  _flash_attn_package("flash_attn2", "flash_attn")]
    return {p.name: p for p in providers}


# ---- the check and the run -----------------------------------------------------------------

def reference_outputs(case: VariantCase, x: VariantInputs) -> List[torch.Tensor]:
    return _package("reference").build(case, x)[0]()


class VariantOracle:
    """The float64 reference of one checked case and the input-dtype baseline error (SPEC
    section 8's rule, as bench.check.Oracle)."""

    def __init__(self, case: VariantCase, with_grads: bool):
        self.case, self.with_grads, self.note = case, with_grads, ""
        self._outputs_and_grads = outputs_and_grads
        self.inputs = make_variant_inputs(case, requires_grad=with_grads)
        x64 = self.inputs.converted(torch.float64, with_grads)
        self.truth = outputs_and_grads(lambda: reference_outputs(case, x64), x64, with_grads)
        x_low = self.inputs.converted(DTYPES[case.dtype], with_grads)
        base = outputs_and_grads(lambda: reference_outputs(case, x_low), x_low, with_grads)
        self.baseline_err = [_max_abs(a, b) for a, b in zip(_flat(base), _flat(self.truth))]

    def compare(self, run: Callable[[], List[torch.Tensor]]):
        got = _flat(self._outputs_and_grads(run, self.inputs, self.with_grads))
        want = _flat(self.truth)
        labels = ["out"] + (["dq", "dk", "dv", "dsinks"] if self.with_grads else [])
        floor = 1e-4 if self.case.dtype == "float32" else 0.0
        worst, failure = 0.0, None
        for label, a, b, base in zip(labels, got, want, self.baseline_err):
            if a.shape != b.shape:
                return False, float("inf"), f"{label}: shape {tuple(a.shape)} != {tuple(b.shape)}"
            err, tol = _max_abs(a, b), max(floor, 2.0 * base + 1e-5)
            worst = max(worst, err)
            if not err <= tol and failure is None:
                failure = f"{label}: max abs error {err:.3g} > tolerance {tol:.3g}"
        return failure is None, worst, failure


def _flat(pair) -> List[torch.Tensor]:
    return list(pair[0]) + list(pair[1])


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check_variant_case(case: VariantCase) -> Tuple[VariantCase, str]:
    scores = case.batch * case.q_heads * sum(case.q_lens[s] * case.kv_lens[s] for s in range(case.num_streams))
    if case.varlen:
        scores = case.q_heads * sum(case.q_lens) ** 2  # the explicit-mask providers see it whole
    if scores <= CHECK_MAX_SCORES:
        return case, ""
    checked = case.scaled(CHECK_MAX_TOKENS)
    return checked, f"checked at {sum(checked.q_lens) if case.varlen else checked.q_lens[0]} tokens, B=1"


def run_variant_case(case: VariantCase, selected: Sequence[Provider], modes: Sequence[str],
                     settings, progress=None) -> List[Dict[str, object]]:
    """Rows of one variants case, through bench.runner.run_provider (check, then time)."""
    names = {p.name for p in selected}
    everything = names >= set(all_providers())  # no --provider filter: flash-attn too
    providers = [p for n, p in variant_providers().items() if n in names or (everything and n not in all_providers())]
    rows: List[Dict[str, object]] = []
    for with_grads, group in ((False, [m for m in modes if m == "fwd"]),
                              (True, [m for m in modes if m in BACKWARD_MODES])):
        if not group:
            continue
        checked, note = check_variant_case(case)
        oracle = VariantOracle(checked, with_grads)
        oracle.note = note
        inputs = oracle.inputs if checked == case else make_variant_inputs(case, with_grads)
        for provider in providers:
            rows += run_provider(case, provider, oracle, inputs, group, settings)
            if progress is not None:
                progress.update(len(group))
            release(case.device)
    add_speedups(rows)
    for r in rows:  # the variant options, in the note column (the table has no column for them)
        r["note"] = "; ".join(n for n in (describe(case), r.get("note")) if n)
    return rows


def describe(case: VariantCase) -> str:
    text = family_name(window=case.window if case.window != (-1, -1) else None, softcap=case.softcap,
                       alibi=case.alibi, sinks=case.sinks)
    if case.varlen:
        lens = sorted(case.q_lens)
        text = ",".join(t for t in (text, f"{len(lens)} docs, median {lens[len(lens) // 2]}, "
                                          f"max {lens[-1]}") if t)
    return text
