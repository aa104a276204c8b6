"""The mmdit suite: diffusion-transformer attention, our processors against diffusers' own.

    python -m bench.mmdit                   # SD3 / Flux joint attention, Wan I2V cross-attention
    python -m bench.mmdit --quick           # tiny shapes (any machine, the CPU included)
    python -m bench --suite mmdit           # the same attention shapes through the kernel providers

Processor level (this file's main): one attention module of each model, built from diffusers'
classes with random weights, run with diffusers' processor under each torch SDPA backend
(`diffusers.math`, `.flash`, `.efficient`, `.cudnn`: concatenation of the text and image Q/K/V,
one SDPA, a split; Wan: two SDPA calls whose outputs are added) and with ours after
`peer_attention.integrations.diffusers.apply` (`pa.auto` and each package backend that runs here:
one joint call on the two streams; Wan: one "peer" mode call). Projections, norms and RoPE are
the same in both and are timed too, so the difference is the attention's. Modes: fwd (under
no_grad, as in sampling) and fwd+bwd (gradients of every input and parameter, as in training);
time (median ms) and, on a GPU, peak memory over the inputs. Each row's `max_err` is its largest
difference to diffusers' processor under the math backend.

Sizes: SD3-Medium / Flux attention (text 512 + image 4096 tokens, 24 heads, head dim 128) and
Wan 2.1 I2V-14B 480p cross-attention (32760 video tokens, 40 heads x 128, 512 text + 257 image
tokens), batch 1, bfloat16 on a GPU (float32 on the CPU).

`mmdit_cases` gives the same attention shapes as kernel-level cases for `python -m bench`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .common import Case
from .timing import TimingSettings, median_ms, peak_memory_mb

WAN_TEXT, WAN_IMAGE = 512, 257


@dataclass(frozen=True)
class Shape:
    model: str            # "sd3" | "flux" | "wan_i2v"
    heads: int
    head_dim: int
    text: int             # text tokens
    image: int            # image tokens (sd3/flux: the latent image; wan: the CLIP image tokens)
    video: int = 0        # wan: video tokens (the queries)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def shapes(quick: bool) -> List[Shape]:
    if quick:
        return [Shape("sd3", 2, 16, 16, 64), Shape("flux", 2, 16, 16, 64),
                Shape("wan_i2v", 2, 16, WAN_TEXT, 9, video=64)]
    return [Shape("sd3", 24, 128, 512, 4096), Shape("flux", 24, 128, 512, 4096),
            Shape("wan_i2v", 40, 128, WAN_TEXT, WAN_IMAGE, video=21 * 60 * 104 // 4)]


# ---- kernel-level cases for python -m bench ------------------------------------------------

def mmdit_cases(dtype: str, device: str, quick: bool):
    """The attention of each shape as a peer case: text + image streams in joint mode, and Wan's
    video queries over text and image key streams (no queries of their own) in peer mode."""
    cases = []
    for s in shapes(quick):
        if s.model == "wan_i2v":
            cases.append(Case("mmdit", "wan_i2v,video->text+image,peer", 1, s.heads, s.heads, s.head_dim,
                              s.head_dim, (s.video, 0, 0), (0, s.text, s.image), dtype, device, "peer",
                              peers=((False, True, True), (False, False, False), (False, False, False)),
                              normalize="peer"))
        elif s.model == "flux":  # sd3 has the same attention shapes
            cases.append(Case("mmdit", "text+image,joint", 1, s.heads, s.heads, s.head_dim, s.head_dim,
                              (s.text, s.image), (s.text, s.image), dtype, device, "peer"))
    return cases


# ---- processor-level modules and inputs ----------------------------------------------------

def build_module(shape: Shape) -> torch.nn.Module:
    """One attention module of the model, as its transformer block builds it (random weights)."""
    torch.manual_seed(0)
    if shape.model == "sd3":
        from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

        return Attention(query_dim=shape.dim, cross_attention_dim=None, added_kv_proj_dim=shape.dim,
                         dim_head=shape.head_dim, heads=shape.heads, out_dim=shape.dim, context_pre_only=False,
                         bias=True, processor=JointAttnProcessor2_0(), qk_norm="rms_norm", eps=1e-6)
    if shape.model == "flux":
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

        return FluxAttention(query_dim=shape.dim, added_kv_proj_dim=shape.dim, dim_head=shape.head_dim,
                             heads=shape.heads, out_dim=shape.dim, context_pre_only=False, bias=True,
                             processor=FluxAttnProcessor(), eps=1e-6)
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    return WanAttention(dim=shape.dim, heads=shape.heads, dim_head=shape.head_dim, eps=1e-6,
                        added_kv_proj_dim=shape.dim, cross_attention_dim_head=shape.head_dim,
                        processor=WanAttnProcessor())


def make_inputs(shape: Shape, dtype: torch.dtype, device: str) -> Tuple[Tuple[torch.Tensor, ...], Dict]:
    """(tensors the gradients are taken of, forward kwargs)."""
    gen = torch.Generator().manual_seed(1)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    if shape.model == "wan_i2v":  # the context is the image tokens, then the 512 text tokens
        video, context = rand(1, shape.video, shape.dim), rand(1, shape.image + shape.text, shape.dim)
        return (video, context), dict(hidden_states=video, encoder_hidden_states=context)
    image, text = rand(1, shape.image, shape.dim), rand(1, shape.text, shape.dim)
    kwargs = dict(hidden_states=image, encoder_hidden_states=text)
    if shape.model == "flux":  # RoPE table over the text rows then the image rows (Flux's layout)
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        cos, sin = get_1d_rotary_pos_embed(shape.head_dim, torch.arange(shape.text + shape.image).double(),
                                           use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64)
        kwargs["image_rotary_emb"] = (cos.float().to(device), sin.float().to(device))
    return (image, text), kwargs


# ---- providers -----------------------------------------------------------------------------

TORCH_SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                       "cudnn": "CUDNN_ATTENTION"}


def providers(device: str) -> Dict[str, Callable[[torch.nn.Module], Tuple[torch.nn.Module, Callable]]]:
    """name -> (module -> (module to run, context manager factory))."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from peer_attention import available_backends
    from peer_attention.integrations.diffusers import apply

    table = {}
    for label, member in TORCH_SDPA_BACKENDS.items():
        if label in ("efficient", "cudnn") and device != "cuda":
            continue
        backend = getattr(SDPBackend, member)
        table[f"diffusers.{label}"] = (lambda b: lambda m: (m, lambda: sdpa_kernel([b])))(backend)

    def ours(backend):
        def make(module):
            module = copy.deepcopy(module)
            apply(module, backend=backend)
            return module, contextlib.nullcontext
        return make

    table["pa.auto"] = ours(None)
    for name, why in available_backends().items():
        if why is None and not (name == "triton" and device == "cpu"):  # the interpreter is no benchmark
            table[f"pa.{name}"] = ours(name)
    return table


def _outputs(result) -> List[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def run_suite(quick: bool, device: str, dtype: torch.dtype, modes, names: Optional[List[str]] = None,
              settings: Optional[TimingSettings] = None) -> List[Dict]:
    settings = settings or (TimingSettings(warmup=1, repeats=3, budget_s=0.1, warmup_ms=5, rep_ms=20) if quick
                            else TimingSettings())
    rows = []
    table = providers(device)
    for shape in shapes(quick):
        base = build_module(shape).to(device=device, dtype=dtype)
        grad_of, kwargs = make_inputs(shape, dtype, device)
        with torch.no_grad(), table["diffusers.math"](base)[1]():
            expected = _outputs(base(**kwargs))
        for name, make in table.items():
            if names and name not in names:
                continue
            module, context = make(base)
            for mode in modes:
                row = dict(model=shape.model, provider=name, mode=mode, dtype=str(dtype).replace("torch.", ""),
                           device=device, ms=None, peak_mb=None, max_err=None, status="ok", note="")
                try:
                    with context():
                        row.update(_measure(module, kwargs, grad_of, mode, device, settings, expected))
                except (RuntimeError, NotImplementedError) as exc:  # a backend that cannot run this shape
                    row.update(status="error", note=str(exc).splitlines()[0][:200])
                rows.append(row)
    return rows


def _measure(module, kwargs, grad_of, mode, device, settings, expected) -> Dict:
    params = [p for p in module.parameters()]
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return module(**kwargs)
    else:
        leaves = [t.detach().requires_grad_() for t in grad_of]
        call_kwargs = {k: next((l for t, l in zip(grad_of, leaves) if t is v), v) for k, v in kwargs.items()}
        grads_out = None

        def fn():
            nonlocal grads_out
            outs = _outputs(module(**call_kwargs))
            if grads_out is None:
                grads_out = [torch.randn_like(o) for o in outs]
            return torch.autograd.grad(outs, leaves + params, grads_out)
    with torch.no_grad():
        got = _outputs(module(**kwargs))
    err = max((g.float() - e.float()).abs().max().item() for g, e in zip(got, expected))
    return dict(ms=median_ms(fn, device, settings), peak_mb=peak_memory_mb(fn, device), max_err=err)


def format_rows(rows: List[Dict]) -> str:
    lines = [f"{'model':8} {'provider':18} {'mode':8} {'ms':>10} {'peak MB':>9} {'max_err':>9}  note"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        mb = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        err = f"{r['max_err']:.1e}" if r["max_err"] is not None else "-"
        lines.append(f"{r['model']:8} {r['provider']:18} {r['mode']:8} {ms:>10} {mb:>9} {err:>9}  {r['note']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mmdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short timings")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--mode", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    parser.add_argument("--provider", default=None, help="comma list of provider names (default: all)")
    parser.add_argument("--out", default=os.path.join("bench", "out"), help="writes mmdit.json there")
    args = parser.parse_args(argv)
    modes = [m for m in args.mode.split(",") if m]
    if any(m not in ("fwd", "fwd+bwd") for m in modes):
        parser.error(f"--mode: expected fwd and/or fwd+bwd, got {args.mode}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    names = args.provider.split(",") if args.provider else None
    rows = run_suite(args.quick, args.device, dtype, modes, names)
    print(format_rows(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "mmdit.json")
    with open(path, "w") as f:
        json.dump({"quick": args.quick, "device": args.device,
                   "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
