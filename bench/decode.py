"""The decode suite: a few query tokens against a long KV cache (python -m bench --suite decode).

Each case is one decode step: q (B, L, Hq, E) over B caches of `cache_len` tokens, GQA 8:1,
contiguous (B, S_max, H, E) or paged (num_blocks, page, H, E) with a block table (pages dealt
out shuffled, as an allocator leaves them). Providers:

  pa.auto / pa.triton / pa.torch   peer_attention.flash_attn_with_kvcache (backend=...)
  torch.<math|efficient|flash|cudnn>  torch SDPA over the cache as one contiguous (B, H, S, E)
                                   view (paged caches gathered once, outside the timing)
  flash_attn                       flash_attn.flash_attn_with_kvcache (pages: multiples of 256)
  flashinfer                       BatchDecodeWithPagedKVCacheWrapper (q_len 1)

Decode reads the whole cache once, so the figure is achieved bandwidth: gb_s = bytes of K and V
read / time, against copy_gb_s, the device-to-device copy bandwidth measured in the same run
((read + written bytes) / time of a large tensor copy); bw_fraction = gb_s / copy_gb_s.
us_per_token = time / (B * L). Every call is non-causal (the L <= 16 queries see the whole cache:
the same keys for every provider). Outputs are checked against float64 math on the gathered
cache where it fits (CHECK_MAX_SCORES), with SPEC section 8's tolerance; speedup = the fastest
torch SDPA row / this row.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

import peer_attention as pa

from .check import CHECK_MAX_SCORES  # above this many scores: no float64 check (it would not fit)
from .common import Case, Unavailable, Unsupported
from .providers import all_providers
from .timing import median_ms

SUITE = "decode"
GQA = 8
TORCH_BACKENDS = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
                  "cudnn": "CUDNN_ATTENTION"}


@dataclass(frozen=True)
class DecodeCase(Case):
    """kind "decode": q_lens = (L,), kv_lens = (cache tokens,); page_size 0 = contiguous."""
    page_size: int = 0

    @property
    def layout(self) -> str:
        return f"paged{self.page_size}" if self.page_size else "contiguous"

    @property
    def case_id(self) -> str:
        return (f"{self.suite}/{self.family}/B{self.batch}/L{self.q_lens[0]}/"
                f"S{self.kv_lens[0]}/{self.dtype}")

    @property
    def kv_bytes(self) -> int:
        """K and V of every sequence, read once."""
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.batch * self.kv_lens[0] * self.kv_heads * (self.head_dim + self.value_dim) * element


def decode_suite(dtype: str, device: str, quick: bool) -> List[Case]:
    """Batch 1-64, cache 1k-128k (B x S <= 2M tokens: K and V then fit with the gathered copy),
    q_len 1/4/16, E 64/128, GQA 8:1 (8 KV heads), contiguous and paged 16/256. --quick: a GPU
    sample at 8k-32k (batch 1 and 16), or tiny shapes on the CPU."""
    if quick and device == "cpu":
        grid = dict(batches=(1, 2), caches=(64,), q_lens=(1, 4), dims=(16,), kv_heads=1,
                    pages=(0, 16))
    elif quick:
        grid = dict(batches=(1, 16), caches=(8192, 32768), q_lens=(1,), dims=(128,), kv_heads=8,
                    pages=(0, 16, 256))
    else:
        grid = dict(batches=(1, 8, 64), caches=(1024, 8192, 32768, 131072), q_lens=(1, 4, 16),
                    dims=(64, 128), kv_heads=8, pages=(0, 16, 256))
    cases: List[Case] = []
    kv_heads = grid["kv_heads"]
    for dim in grid["dims"]:
        for page in grid["pages"]:
            family = f"E={dim},gqa={GQA},{f'paged{page}' if page else 'contiguous'}"
            for q_len in grid["q_lens"]:
                for batch in grid["batches"]:
                    for cache in grid["caches"]:
                        if batch * cache > (1 << 21):
                            continue
                        cases.append(DecodeCase(SUITE, family, batch, kv_heads * GQA, kv_heads, dim,
                                                dim, (q_len,), (cache,), dtype, device, "decode",
                                                page_size=page))
    return cases


# ---- tensors -------------------------------------------------------------------------------

@dataclass
class DecodeInputs:
    q: torch.Tensor                    # (B, L, Hq, E)
    k_cache: torch.Tensor              # (B, S, H, E) or (blocks, page, H, E)
    v_cache: torch.Tensor
    block_table: Optional[torch.Tensor]
    seqlens: torch.Tensor              # (B,) int32, every entry cache_len
    k: torch.Tensor                    # (B, H, S, E): the keys as one contiguous view / gathered
    v: torch.Tensor


def make_decode_inputs(case: DecodeCase) -> DecodeInputs:
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    batch, q_len, cache = case.batch, case.q_lens[0], case.kv_lens[0]
    dtype, device = case.torch_dtype, case.device

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = rand(batch, q_len, case.q_heads, case.head_dim)
    if not case.page_size:
        k_cache = rand(batch, cache, case.kv_heads, case.head_dim)
        v_cache = rand(batch, cache, case.kv_heads, case.value_dim)
        block_table = None
        k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    else:
        pages = -(-cache // case.page_size)
        order = torch.randperm(batch * pages, generator=gen)
        block_table = order.view(batch, pages).to(device=device, dtype=torch.int32)
        k_cache = rand(batch * pages, case.page_size, case.kv_heads, case.head_dim)
        v_cache = rand(batch * pages, case.page_size, case.kv_heads, case.value_dim)
        rows = block_table.long()
        k = k_cache[rows].flatten(1, 2)[:, :cache].transpose(1, 2).contiguous()
        v = v_cache[rows].flatten(1, 2)[:, :cache].transpose(1, 2).contiguous()
    seqlens = torch.full((batch,), cache, dtype=torch.int32, device=device)
    return DecodeInputs(q, k_cache, v_cache, block_table, seqlens, k, v)


def reference_output(x: DecodeInputs, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Plain math over the gathered keys in `dtype`: (B, L, Hq, E)."""
    q = x.q.to(dtype).transpose(1, 2)
    group = q.shape[1] // x.k.shape[1]
    k = x.k.to(dtype).repeat_interleave(group, 1)
    v = x.v.to(dtype).repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return (scores.softmax(-1) @ v).transpose(1, 2)


def tolerance(x: DecodeInputs, want: torch.Tensor) -> float:
    """SPEC section 8 (as bench/check.py): 2x the error of the same math in the input dtype,
    plus 1e-5; at least 1e-4 in float32."""
    err = float((reference_output(x, x.q.dtype).double() - want).abs().max())
    floor = 1e-4 if x.q.dtype == torch.float32 else 0.0
    return max(2 * err + 1e-5, floor)


# ---- providers -----------------------------------------------------------------------------

Build = Callable[[DecodeCase, DecodeInputs], Callable[[], torch.Tensor]]


def _package(backend: Optional[str]) -> Build:
    def build(case, x):
        def call():
            return pa.flash_attn_with_kvcache(x.q, x.k_cache, x.v_cache, cache_seqlens=x.seqlens,
                                           block_table=x.block_table, backend=backend)
        return call
    return build


def _torch_sdpa(label: str) -> Build:
    def build(case, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, TORCH_BACKENDS[label])
        q = x.q.transpose(1, 2)

        def call():
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(q, x.k, x.v, enable_gqa=True)
            return out.transpose(1, 2)
        return call
    return build


def _flash_attn(case, x):
    module = _import("flash_attn")
    if case.page_size % 256:
        raise Unsupported("flash-attn 2 pages must be multiples of 256")
    return lambda: module.flash_attn_with_kvcache(x.q, x.k_cache, x.v_cache, cache_seqlens=x.seqlens,
                                                  block_table=x.block_table)


def _flashinfer(case, x):
    module = _import("flashinfer")
    if case.q_lens[0] != 1:
        raise Unsupported("FlashInfer's decode wrapper takes one query per sequence")
    batch, cache = case.batch, case.kv_lens[0]
    page = case.page_size or cache  # a contiguous cache: one page per sequence
    pages = -(-cache // page)
    table = (x.block_table if x.block_table is not None
             else torch.arange(batch, dtype=torch.int32, device=x.q.device)[:, None])
    indices = table.reshape(-1).to(torch.int32)
    indptr = torch.arange(0, batch * pages + 1, pages, dtype=torch.int32, device=x.q.device)
    last = torch.full((batch,), cache - (pages - 1) * page, dtype=torch.int32, device=x.q.device)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=x.q.device)
    wrapper = module.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(indptr, indices, last, case.q_heads, case.kv_heads, case.head_dim, page,
                 q_data_type=x.q.dtype, kv_data_type=x.k_cache.dtype)
    q = x.q[:, 0]
    return lambda: wrapper.run(q, (x.k_cache, x.v_cache))[:, None]


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Unavailable(f"{name} is not importable: {exc}") from None


def decode_providers() -> Dict[str, Build]:
    providers: Dict[str, Build] = {"pa.auto": _package(None), "pa.triton": _package("triton"),
                                   "pa.torch": _package("torch")}
    providers.update({f"torch.{label}": _torch_sdpa(label) for label in TORCH_BACKENDS})
    providers.update({"flash_attn": _flash_attn, "flashinfer": _flashinfer})
    return providers


# ---- bandwidth and rows --------------------------------------------------------------------

_COPY_GB_S: Dict[str, float] = {}


def copy_bandwidth_gb_s(device: str, settings) -> float:
    """Device-to-device copy bandwidth, (read + written bytes) / time of a tensor copy (1 GiB on a
    GPU, 64 MiB on the CPU), measured once per run and device."""
    if device not in _COPY_GB_S:
        size = (1 << 30) if device == "cuda" else (64 << 20)
        src = torch.empty(size, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), device, settings.timing)
        _COPY_GB_S[device] = 2 * size / (ms * 1e-3) / 1e9
        del src, dst
    return _COPY_GB_S[device]


def run_decode_case(case: DecodeCase, selected: Sequence, modes: Sequence[str], settings,
                    progress=None) -> List[Dict[str, object]]:
    """One row per decode provider (forward only: decode is inference). The bench's own provider
    filter picks pa.auto/pa.triton/pa.torch/torch.<backend> by name; with no filter (every
    provider) flash_attn and FlashInfer run too."""
    names = {p.name for p in selected}
    # no --provider filter (the default list): every decode provider, pa.auto and flash-attn too
    everything = names >= {n for n, p in all_providers().items() if p.default}
    if "fwd" not in modes:
        return []
    copy_gb_s = copy_bandwidth_gb_s(case.device, settings)
    x = make_decode_inputs(case)
    scores = case.batch * case.q_heads * case.q_lens[0] * case.kv_lens[0]
    want = reference_output(x) if scores <= CHECK_MAX_SCORES else None
    limit = tolerance(x, want) if want is not None else None
    rows: List[Dict[str, object]] = []
    for name, build in decode_providers().items():
        if not (name in names or everything):
            continue
        row = _row(case, name, copy_gb_s)
        try:
            fn = build(case, x)
            out = fn()
            if want is not None:
                row["max_err"] = float((out.double() - want).abs().max())
                row["correct"] = row["max_err"] <= limit
            ms = median_ms(fn, case.device, settings.timing)
        except Unavailable as exc:
            row.update(status="unavailable", note=str(exc))
        except NotImplementedError as exc:  # Unsupported, or a backend that declines with its reasons
            row.update(status="unsupported", note=str(exc))
        except Exception as exc:  # any other provider failure is a row, never the end of the run
            text = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            if "No viable backend" in text:  # torch's SDPA backend does not take this call
                row.update(status="unsupported", note=f"torch: {text}")
            else:
                oom = "out of memory" in text
                row.update(status="oom" if oom else "error", note=f"{type(exc).__name__}: {text}")
        else:
            gb_s = case.kv_bytes / (ms * 1e-3) / 1e9
            row.update(status="ok", ms=ms, gb_s=gb_s, bw_fraction=gb_s / copy_gb_s,
                       us_per_token=ms * 1e3 / (case.batch * case.q_lens[0]),
                       note="" if want is not None else "not checked (too large for the oracle)")
        rows.append(row)
        if progress is not None:
            progress.update(1)
        if case.device == "cuda":
            torch.cuda.empty_cache()
    _speedups(rows)
    return rows


def _row(case: DecodeCase, provider: str, copy_gb_s: float) -> Dict[str, object]:
    row = {f.name: getattr(case, f.name) for f in dataclasses.fields(Case)}
    row.update(case_id=case.case_id, device_type=case.device, seq_len=case.kv_lens[0],
               num_streams=1, mode="fwd", provider=provider,
               package=provider.startswith("pa."), page_size=case.page_size,
               copy_gb_s=copy_gb_s, kv_bytes=case.kv_bytes)
    return row


def _speedups(rows: List[Dict[str, object]]) -> None:
    """speedup = the fastest torch SDPA backend's time / this row's time."""
    torch_ms = [r["ms"] for r in rows if r["status"] == "ok" and str(r["provider"]).startswith("torch.")]
    if not torch_ms:
        return
    best = min(torch_ms)
    for r in rows:
        if r["status"] == "ok":
            r["speedup"] = best / r["ms"]


def describe_bandwidth(rows: Sequence[Dict[str, object]]) -> str:
    """The decode rows as a terminal table: achieved bandwidth against the copy bandwidth."""
    lines = []
    decode = [r for r in rows if r.get("suite") == SUITE and r.get("status") == "ok"]
    if not decode:
        return ""
    copy = decode[0]["copy_gb_s"]
    lines.append(f"decode: device-to-device copy {float(copy):.4g} GB/s (measured in this run)")
    lines.append(f"{'case':<52} {'provider':<16} {'GB/s':>9} {'of copy':>8} {'us/token':>10} {'vs torch':>8}")
    for r in decode:
        lines.append(f"{r['case_id']:<52} {r['provider']:<16} {float(r['gb_s']):>9.3g} "
                     f"{float(r['bw_fraction']):>8.1%} {float(r['us_per_token']):>10.2f} "
                     f"{_fmt(r.get('speedup')):>8}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value in (None, "") else f"{float(value):.2f}x"
