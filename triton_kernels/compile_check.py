"""Compile report: the kernels compiled for a GPU target without a GPU (ptxas, cuobjdump and
nvdisasm ship with triton), with the specialisation a real launch gets.

    python -m peer_attention.triton_kernels.compile_check --arch sm90a --headline --dump DIR

Launch-faithful: the launchers' own argument lists (fwd.forward_launch, bwd.backward_launches)
are bound, for real-shaped CPU tensors, through Triton's own binder and argument packer, so the
stride == 1 / divisible-by-16 specialisation is the one a CUDA launch of the same shapes gets
(a bare signature would compile code that no launch runs). Each kernel is compiled at the
config autotune tries first for that architecture.

Printed per kernel: config (BLOCK_M x BLOCK_N, warps, stages), wgmma instructions (PTX), TMA
loads (PTX cp.async.bulk.tensor global -> shared), registers and spill bytes (ptxas -v), shared
memory, and the SASS instruction count of the innermost loops that issue wgmma (the steady
state). `--features` compiles one small problem per feature combination instead (does every
variant compile at all); TRITON_INTERPRET must be unset (it replaces the compiler).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

SMEM_OPTIN = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def faithful_compile(fn, args, kwargs, config, arch):
    """Compile JITFunction `fn` for `arch` exactly as `fn[grid](*args, **kwargs, **config)`
    would on a device of that architecture (Triton's binder + _pack_args)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args,
                                                          specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def first_config(kernel_name, problem, arch):
    """The config autotune tries first for this kernel on `arch`."""
    from .configs import autotune_configs, fitting_configs, forward_kind
    from .fwd import one_accumulator
    from .utils import padded_dim

    kind = {"dq": "dq", "dkdv": "dkdv"}.get(kernel_name, "fwd")
    this_kind = forward_kind(one_accumulator(problem)) if kernel_name == "fwd" else kind
    return fitting_configs(autotune_configs(kind), arch, SMEM_OPTIN.get(arch, 101376),
                           padded_dim(problem.head_dim), padded_dim(problem.value_dim),
                           problem.q.element_size(), this_kind)[0]


def _sass_loops(sass):
    """Instruction counts of the innermost loops (backward branches) that issue wgmma."""
    instrs = {}  # address -> instruction text
    for line in sass.splitlines():
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if ins:
            instrs[int(ins.group(1), 16)] = ins.group(2)
    loops = []
    for addr, text in instrs.items():
        target = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            if any("HGMMA" in t for a, t in instrs.items() if start <= a <= addr):
                loops.append((start, addr))
    innermost = [(a, b) for a, b in loops
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return sorted(sum(1 for x in instrs if a <= x <= b) for a, b in innermost)


def analyse(compiled, arch):
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={gpu}", ptx_path, "-o",
                              os.path.join(tmp, "v.cubin")], capture_output=True, text=True,
                             check=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path], capture_output=True,
                              text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global", ptx)),
        registers=int(regs.group(1)) if regs else -1,
        spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else -1,
        shared=compiled.metadata.shared,
        loop_instructions=_sass_loops(sass),
    )


def _tensors(shape_q, shape_kv, ev, dtype):
    q = torch.empty(shape_q, dtype=dtype)
    k = torch.empty(shape_kv, dtype=dtype)
    v = torch.empty(shape_kv[:-1] + (ev,), dtype=dtype)
    return q, k, v


def headline_problems(seq=4096, batch=1, heads=2, dim=128, dtype=torch.bfloat16):
    """name -> AttentionProblem: SDPA hdim 128 bf16 (non-causal, causal), 3-stream joint with
    gates and bias. Real shapes (contiguous (B, H, T, E), as SDPA callers pass them)."""
    from ..problem import AttentionProblem

    q, k, v = _tensors((batch, heads, seq, dim), (batch, heads, seq, dim), dim, dtype)
    scale = dim ** -0.5

    def sdpa(causal):
        return AttentionProblem(q, k, v, (seq,), (seq,), (1,), None, None, None, None, None,
                                0.0, causal, scale, "joint")

    streams = 3
    q3, k3, v3 = _tensors((batch, heads, streams * seq, dim), (batch, heads, streams * seq, dim),
                          dim, dtype)
    gate = torch.empty(batch, streams, streams, heads, dim, dtype=dtype)
    bias = torch.empty(batch, streams, streams, heads, dtype=dtype)
    joint = AttentionProblem(q3, k3, v3, (seq,) * streams, (seq,) * streams, (1,) * 9, gate, bias,
                             None, None, None, 0.0, False, scale, "joint")
    return {"sdpa_d128_bf16": sdpa(False), "sdpa_d128_bf16_causal": sdpa(True),
            "joint3_gate_bias_d128_bf16": joint}


def feature_problems(dim=64, seq=96, dtype=torch.bfloat16):
    """name -> small AttentionProblem per feature family, so that every kernel flag is compiled
    by the real compiler at least once (the interpreter accepts code ptxas would reject)."""
    from ..problem import AttentionProblem

    def make(q_lens, kv_lens, peers, heads=(2, 2), e=dim, ev=dim, dt=dtype, gate=False,
             bias=False, kv_lengths=False, mask=None, dropout=0.0, causal=False,
             normalize="joint", window=(-1, -1), bottom_right=False, softcap=0.0, alibi=False,
             sinks=False):
        n = len(q_lens)
        q = torch.empty(1, heads[0], sum(q_lens), e, dtype=dt)
        k = torch.empty(1, heads[1], sum(kv_lens), e, dtype=dt)
        v = torch.empty(1, heads[1], sum(kv_lens), ev, dtype=dt)
        attn_mask = None
        if mask is not None:
            attn_mask = torch.empty(1, 1, sum(q_lens), sum(kv_lens), dtype=mask).expand(
                1, heads[0], -1, -1)
        return AttentionProblem(
            q, k, v, tuple(q_lens), tuple(kv_lens), peers,
            torch.empty(1, n, n, heads[0], ev, dtype=dt) if gate else None,
            torch.empty(1, n, n, heads[0], dtype=dt) if bias else None,
            torch.ones(1, n, dtype=torch.int64) if kv_lengths else None, attn_mask,
            torch.tensor([1, 2]) if dropout else None, dropout, causal, e ** -0.5, normalize,
            window[0], window[1], bottom_right, softcap,
            torch.empty(1, heads[0], dtype=torch.float32) if alibi else None,
            torch.empty(heads[0], dtype=torch.float32) if sinks else None)

    one = dict(q_lens=(seq,), kv_lens=(seq + 32,), peers=(1,))
    three = dict(q_lens=(seq, 48, 80), kv_lens=(seq, 64, 32), peers=(1, 0, 1, 1, 1, 1, 0, 1, 1))
    return {
        "float_mask_dropout_gqa": make(**one, heads=(4, 2), mask=dtype, dropout=0.1),
        "bool_mask_kv_lengths_causal": make(**one, mask=torch.bool, kv_lengths=True, causal=True),
        "window_bottom_right_softcap_alibi_sinks": make(**one, window=(32, 0), bottom_right=True,
                                                         softcap=30.0, alibi=True, sinks=True),
        "varlen_causal": make(q_lens=(seq, 48, 80), kv_lens=(seq, 64, 32), peers=(),
                              causal=True, bottom_right=True),
        "joint3_everything": make(**three, gate=True, bias=True, kv_lengths=True, causal=True,
                                  window=(16, -1), softcap=20.0, alibi=True, sinks=True),
        "peer3_gate": make(**three, gate=True, normalize="peer", causal=True),
        "fp32_d256_odd": make(**one, e=256, ev=200, dt=torch.float32),
    }


def kernel_launches(problem, with_backward, arch=90):
    """[(kernel name, JITFunction, args, kwargs)] of a problem's forward (and backward), as a
    CUDA device of `arch` would launch them (tensor descriptors from sm90 when strides allow)."""
    from . import bwd, fwd
    from .utils import tma_ok

    out = torch.empty(problem.q.shape[:3] + (problem.value_dim,), dtype=problem.q.dtype)
    shape = (problem.q.shape[0], problem.q.shape[1], problem.num_streams, problem.q.shape[2]) \
        if problem.normalize == "peer" else problem.q.shape[:3]
    lse = torch.empty(shape, dtype=torch.float32)
    fn, args, kwargs, _ = fwd.forward_launch(problem, out, lse)
    kwargs["USE_TMA"] = arch >= 90 and tma_ok(problem.q, problem.k, problem.v, out)
    mask = fwd.mask_for_kernel(problem.attn_mask)
    kwargs["MASK_TMA"] = kwargs["USE_TMA"] and fwd.mask_tma_ok(mask)
    launches = [("fwd", fn, args, kwargs)]
    if with_backward:
        needs = [True, True, True, problem.gate is not None, problem.bias is not None, False, False]
        bufs = bwd.gradient_buffers(problem, needs)
        for name, fn, args, kwargs, _ in bwd.backward_launches(problem, out.clone(), out, lse,
                                                               needs, bufs):
            kwargs["USE_TMA"] = arch >= 90 and tma_ok(problem.q, problem.k, problem.v, out)
            launches.append((f"bwd_{name}", fn, args, kwargs))
    return launches


def report(arch=90, dump=None, problems=None, backward_for=None, printer=print):
    """Compile the problems' kernels (default: the headline variants, backward of the two SDPA
    ones); returns [row dict]; writes PTX into `dump` if given."""
    if problems is None:
        problems = headline_problems()
        backward_for = ("sdpa_d128_bf16", "sdpa_d128_bf16_causal")
    rows = []
    for variant, problem in problems.items():
        with_backward = backward_for is None or variant in backward_for
        for name, fn, args, kwargs in kernel_launches(problem, with_backward, arch):
            config = first_config(name.replace("bwd_", ""), problem, arch)
            compiled = faithful_compile(fn, args, kwargs, config, arch)
            row = dict(kernel=name, variant=variant,
                       config=f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} "
                              f"w{config.num_warps} s{config.num_stages}",
                       **analyse(compiled, arch))
            if dump:
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"{name}_{variant}.ptx"), "w") as f:
                    f.write(compiled.asm["ptx"])
            rows.append(row)
            printer(format_row(row))
    return rows


HEADER = ("| kernel | variant | config | wgmma | TMA loads | registers | spill bytes | shared B "
          "| inner-loop SASS instrs |\n|---|---|---|---|---|---|---|---|---|")


def format_row(r):
    loops = ", ".join(str(n) for n in r["loop_instructions"]) or "-"
    return (f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['wgmma']} | {r['tma_loads']} "
            f"| {r['registers']} | {r['spill_bytes']} | {r['shared']} | {loops} |")


def _arch(text):
    digits = re.sub(r"[^0-9]", "", text)
    if not digits:
        raise argparse.ArgumentTypeError(f"--arch: expected e.g. sm90a or 90, got {text!r}")
    return int(digits)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=_arch, default=90, help="sm90a (default), sm80, ...")
    parser.add_argument("--headline", action="store_true",
                        help="the headline variants with their table (default)")
    parser.add_argument("--dump", default=None, help="write each kernel's PTX into this folder")
    parser.add_argument("--features", nargs="?", const="all", default=None,
                        help="also compile one small problem per feature family (fwd + bwd): "
                             "all, or a comma-separated list of names")
    parser.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    opts = parser.parse_args(argv)
    from .utils import INTERPRET

    if INTERPRET:
        raise SystemExit("compile_check: unset TRITON_INTERPRET (it replaces the compiler)")
    print(f"sm{opts.arch}: launch-faithful compile of the headline variants")
    print(HEADER)
    rows = report(opts.arch, opts.dump) if opts.headline or not opts.features else []
    if opts.features:
        problems = feature_problems()
        if opts.features != "all":
            names = opts.features.split(",")
            unknown = [n for n in names if n not in problems]
            if unknown:
                parser.error(f"--features: unknown {unknown}, expected some of {list(problems)}")
            problems = {n: problems[n] for n in names}
        rows += report(opts.arch, opts.dump, problems=problems)
    print(f"compiled {len(rows)} kernels")
    if opts.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
