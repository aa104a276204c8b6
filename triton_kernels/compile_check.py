"""Compile check: the kernels compiled for every GPU architecture of SPEC section 13 without a
GPU (Triton's compiler, its ptxas - the Blackwell build for sm_100a/sm_120 - and cuobjdump),
with the specialisation a real launch gets.

    python -m peer_attention.triton_kernels.compile_check --arch sm90a [--jobs N]
    python -m peer_attention.triton_kernels.compile_check --arch sm120 --autotune-off --sample 8
    python -m peer_attention.triton_kernels.compile_check --arch sm100a --headline --dump DIR

The sweep (default) compiles every kernel (forward, preprocess, dQ, dK/dV) x dtype (fp16, bf16,
fp32) x head dim (16 ... 256) x feature family (plain, causal, gate/bias, float mask, peer mode,
variants) at each candidate config of the architecture (configs.CANDIDATES), selects among them
exactly as the runtime pruner does (configs.select: fits the shared memory / tensor memory, no
trap, no spills for 16-bit inputs where possible), and exits non-zero if a config does not
compile, nothing fits where configs.NO_FIT does not decline, or a kept 16-bit kernel at head
dim <= 128 spills. --autotune-off compiles only up to the config used
with PEER_ATTENTION_TRITON_AUTOTUNE=0 (the first that fits); --sample N draws N tasks (CI).

Launch-faithful: the launchers' own argument lists (fwd.forward_launch, bwd.backward_launches)
are bound, for real-shaped CPU tensors, through Triton's own binder and argument packer
(fit.compile_launch, which the runtime pruner uses too), so the stride == 1 / divisible-by-16
specialisation is the one a CUDA launch of the same shapes gets.

--headline prints the table of the headline variants (SDPA bf16 head dim 128, the gated 3-stream
joint forward) at the autotune-off config: shared memory vs the limit, tensor-memory columns,
registers and spill bytes (ptxas -v), tensor-core instructions in the PTX (wgmma on sm_90,
tcgen05.mma on sm_100, mma.sync elsewhere), TMA loads, and the SASS instruction counts of the
innermost tensor-core loops (the steady state). `--features` compiles one small problem per
feature combination. TRITON_INTERPRET must be unset (it replaces the compiler).
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

from . import ledger
from .fit import SMEM_OPTIN, compile_launch, misfit, ptxas_resources, target, usage



def _tool(name, arch=90):
    """Triton's bundled CUDA tool (ptxas for sm_100 and newer: its Blackwell build)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    if name == "ptxas":
        return get_ptxas(arch).path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def gpu_name(arch):
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return sm_arch_from_capability(arch)


def faithful_compile(fn, args, kwargs, config, arch):
    """Compile JITFunction `fn` for `arch` exactly as `fn[grid](*args, **kwargs, **config)`
    would on a device of that architecture (Triton's binder + _pack_args)."""
    return compile_launch(fn, args, kwargs, config, target(arch))


def kernel_kind(kernel_name, problem):
    """The configs.CANDIDATES kind of a launch of compile_check's kernel_launches."""
    from .configs import forward_kind
    from .utils import one_accumulator

    name = kernel_name.replace("bwd_", "")
    if name in ("dq", "dkdv"):
        return name
    return forward_kind(one_accumulator(problem)) if name == "fwd" else "fwd"


def first_config(kernel_name, problem, arch):
    """The config autotune tries first for this kernel on `arch`."""
    from .configs import make_config, candidates

    from .utils import padded_dim

    dim = padded_dim(max(problem.head_dim, problem.value_dim))
    return make_config(*candidates(arch, kernel_kind(kernel_name, problem),
                               problem.q.element_size(), dim)[0])


def _sass_loops(sass):
    """Instruction counts of the innermost loops (backward branches) that issue tensor-core
    instructions (HGMMA on sm_90, UTC*MMA on sm_100, HMMA elsewhere)."""
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
            if any(re.search(r"\b(HGMMA|UTC\w*MMA|HMMA)\b", t)
                   for a, t in instrs.items() if start <= a <= addr):
                loops.append((start, addr))
    innermost = [(a, b) for a, b in loops
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return sorted(sum(1 for x in instrs if a <= x <= b) for a, b in innermost)


def _resources(compiled, arch, use_ptxas):
    """(registers, spill bytes). With use_ptxas: `ptxas -v` again (fit.ptxas_resources: spill
    stores + loads, what select() and the runtime pruner judge 16-bit kernels by); else from the
    cubin (`cuobjdump -res-usage`: registers and the stack frame), which costs no second ptxas
    run (fp32 at head dim 256 takes ptxas minutes, and fp32 has no spill rule)."""
    if use_ptxas:
        return ptxas_resources(compiled, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path],
                             capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    return (int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1)


def analyse(compiled, arch, loops=True, use_ptxas=True):
    """Registers and spill bytes (_resources), tensor-core instructions in the PTX (wgmma:
    sm_90, tcgen05.mma: sm_100, mma.sync: the rest), TMA loads, shared memory / tensor-memory
    columns / trap (fit.usage) and, with `loops`, the SASS instruction counts of the innermost
    tensor-core loops."""
    ptx = compiled.asm["ptx"]
    registers, spill_bytes = _resources(compiled, arch, use_ptxas)
    sass = ""
    if loops:
        with tempfile.TemporaryDirectory() as tmp:
            cubin_path = os.path.join(tmp, "k.cubin")
            with open(cubin_path, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path],
                                  capture_output=True, text=True, check=True).stdout
    return dict(
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        tcgen05=len(re.findall(r"tcgen05\.mma", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global", ptx)),
        registers=registers,
        spill_bytes=spill_bytes,
        **usage(compiled),
        loop_instructions=_sass_loops(sass) if loops else [],
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


def make_problem(q_lens, kv_lens, peers, heads=(2, 2), e=64, ev=None, dt=torch.bfloat16,
                 gate=False, bias=False, kv_lengths=False, mask=None, dropout=0.0, causal=False,
                 normalize="joint", window=(-1, -1), bottom_right=False, softcap=0.0,
                 alibi=False, sinks=False):
    """A CPU AttentionProblem of real-shaped empty tensors (contiguous (B, H, T, E))."""
    from ..problem import AttentionProblem

    ev = e if ev is None else ev
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


def _one(seq):
    return dict(q_lens=(seq,), kv_lens=(seq + 32,), peers=(1,))


def _three(seq):
    return dict(q_lens=(seq, 48, 80), kv_lens=(seq, 64, 32), peers=(1, 0, 1, 1, 1, 1, 0, 1, 1))


def feature_problems(dim=64, seq=96, dtype=torch.bfloat16):
    """name -> small AttentionProblem per feature combination, so that every kernel flag is
    compiled by the real compiler at least once (the interpreter accepts code ptxas would
    reject)."""
    def make(**kw):
        return make_problem(**dict(dict(e=dim, dt=dtype), **kw))

    one, three = _one(seq), _three(seq)
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


# The sweep: every kernel x dtype x head dim x feature family, each at the candidates the
# pruner would compile on the architecture (all of them; with --autotune-off up to the first
# that fits, the config used with autotuning off).
FAMILIES = {
    "plain": lambda seq: _one(seq),
    "causal": lambda seq: dict(_one(seq), causal=True),
    "gate_bias": lambda seq: dict(_three(seq), gate=True, bias=True),
    "float_mask": lambda seq: dict(_one(seq), mask="dtype"),
    "peer": lambda seq: dict(_three(seq), gate=True, normalize="peer", causal=True),
    "variants": lambda seq: dict(_one(seq), window=(32, 0), bottom_right=True, softcap=30.0,
                                 alibi=True, sinks=True, kv_lengths=True),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (16, 32, 64, 128, 256)
KERNELS = ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv")


def family_problem(family, dtype_name, dim, seq=96):
    kw = FAMILIES[family](seq)
    dt = DTYPES[dtype_name]
    if kw.get("mask") == "dtype":
        kw["mask"] = dt
    return make_problem(e=dim, dt=dt, **kw)


def sweep_tasks(arch, families=None, dtypes=None, dims=None, kernels=None):
    return [(arch, f, d, e, k) for f in (families or FAMILIES) for d in (dtypes or DTYPES)
            for e in (dims or HEAD_DIMS) for k in (kernels or KERNELS)]


def _config_name(c):
    phases = c.kwargs.get("PHASES", 1)
    return (f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
            + (f" p{phases}" if phases != 1 else ""))


def check_task(task, autotune_off=False, ledger_dir=None, mode="compile"):
    """Compile one (arch, family, dtype, head dim, kernel) at the candidates the pruner would
    compile, select as the pruner does (configs.select), and say what is wrong: a compile
    failure, nothing that fits where NO_FIT does not decline it, or a kept config that spills in
    a 16-bit kernel at head dim <= 128.

    With a ledger (ledger_dir), mode says where each config's measurement comes from:
    "compile": compiled, and a failure where the ledger's row for the same compile differs;
    "cached": the ledger's row where it has one, else compiled; "ledger": the ledger's rows only,
    and where one is missing the task is uncovered (result["uncovered"]: nothing is checked)."""
    from .configs import NO_FIT, make_config, candidates, select, spill_allowance

    arch, family, dtype_name, dim, kernel = task
    problem = family_problem(family, dtype_name, dim)
    launch = [x for x in kernel_launches(problem, kernel != "fwd", arch) if x[0] == kernel]
    result = dict(arch=arch, family=family, dtype=dtype_name, dim=dim, kernel=kernel, rows=[],
                  kept=[], failures=[], mode=mode, uncovered=[], verified=0)
    if not launch:
        return result
    _, fn, args, kwargs = launch[0]
    kind = kernel_kind(kernel, problem)
    sixteen_bit = dtype_name != "fp32"
    dim_pad = max(kwargs["E_PAD"], kwargs["EV_PAD"])
    configs = [make_config(*c) for c in candidates(arch, kind, DTYPES[dtype_name].itemsize,
                                               dim_pad)]
    book = ledger.load(ledger_dir, arch) if ledger_dir else {}
    keys = {_config_name(c): ledger.launch_key(fn, args, kwargs, c, arch) if ledger_dir else None
            for c in configs}
    if mode == "ledger":
        result["uncovered"] = [name for name, key in keys.items() if key not in book]
        if result["uncovered"]:
            return result

    def measure(config):
        name = _config_name(config)
        row = dict(config=name, key=keys[name])
        recorded = book.get(keys[name])
        if recorded is not None and mode != "compile":
            row.update({k: recorded[k] for k in ledger.FIELDS}, source="ledger")
        else:
            row["source"] = "compiled"
            try:
                row.update(analyse(faithful_compile(fn, args, kwargs, config, arch), arch,
                                   loops=False, use_ptxas=sixteen_bit))
            except Exception as exc:  # noqa: BLE001 - reported as a failure below
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                result["failures"].append(f"{row['config']} does not compile ({row['error']})")
                row.update(shared=1 << 30, tmem=0, trap=False)
            if recorded is not None and "error" not in row:
                result["verified"] += 1
                wrong = ledger.differences(recorded, row)
                if wrong:
                    result["failures"].append(
                        f"{name}: the compile differs from its ledger row (field: (ledger, "
                        f"compiled)) {wrong}")
        row["fits"] = misfit(row, SMEM_OPTIN[arch]) is None
        result["rows"].append(row)
        return dict(row, spills=max(row.get("spill_bytes", 0), 0))

    # the full sweep compiles every candidate (no shortcut) and so checks the shortcut's claim
    kept, rejected = select(configs, measure, SMEM_OPTIN[arch], sixteen_bit, autotune_off,
                            shortcut=autotune_off, spill_ok=spill_allowance(arch, dim_pad))
    result["kept"] = [_config_name(c) for c in kept]
    smallest = result["rows"][-1] if not autotune_off and result["rows"] else None
    if smallest and not smallest["fits"] and kept:
        result["failures"].append(f"the smallest candidate {smallest['config']} does not fit but "
                                  f"{result['kept'][0]} does (select's shortcut is wrong)")
    declined = NO_FIT.get(arch, {}).get((kind, str(DTYPES[dtype_name])[6:], dim))
    what = f"sm{arch} {kernel} {family} {dtype_name} hd{dim}"
    if not kept and not declined:
        result["failures"].append(f"{what}: no config fits and NO_FIT does not decline it: "
                                  + "; ".join(f"{_config_name(c)}: {r}"
                                              for c, r in rejected.items()))
    if kept and declined:  # NO_FIT is per (kind, dtype, head dim): the worst family decides
        result["notes"] = [f"{what}: declined by NO_FIT, though {result['kept'][0]} fits"]
    if sixteen_bit and dim <= 128:
        by_name = {r["config"]: r for r in result["rows"]}
        for name in result["kept"]:
            if by_name[name].get("spill_bytes", 0) > 0:
                result["failures"].append(f"{what}: kept {name} spills "
                                          f"{by_name[name]['spill_bytes']} B")
    return result


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


def autotune_off_config(fn, args, kwargs, kind, arch, sixteen_bit):
    """(config, compiled) of the config that runs with autotuning off on `arch`: the first
    candidate that fits (and, for 16-bit inputs, does not spill where one such fits)."""
    from .configs import make_config, candidates, select, spill_allowance

    compiled = {}

    def measure(config):
        c = compiled[_config_name(config)] = faithful_compile(fn, args, kwargs, config, arch)
        use = usage(c)
        if misfit(use, SMEM_OPTIN[arch]) is None and sixteen_bit:
            use["spills"] = ptxas_resources(c, arch)[1]
        return use

    element_size = 2 if sixteen_bit else 4
    dim = max(kwargs["E_PAD"], kwargs["EV_PAD"])
    kept, rejected = select([make_config(*c) for c in candidates(arch, kind, element_size, dim)],
                            measure, SMEM_OPTIN[arch], sixteen_bit, first_only=True,
                            spill_ok=spill_allowance(arch, dim))
    if not kept:
        return None, rejected
    return kept[0], compiled[_config_name(kept[0])]


def report(arch=90, dump=None, problems=None, backward_for=None, printer=print):
    """Compile the problems' kernels (default: the headline variants, backward of the two SDPA
    ones) at the config used with autotuning off; returns [row dict]; writes PTX into `dump` if
    given."""
    if problems is None:
        problems = headline_problems()
        backward_for = ("sdpa_d128_bf16", "sdpa_d128_bf16_causal")
    rows = []
    for variant, problem in problems.items():
        with_backward = backward_for is None or variant in backward_for
        sixteen_bit = problem.q.element_size() == 2
        for name, fn, args, kwargs in kernel_launches(problem, with_backward, arch):
            config, compiled = autotune_off_config(fn, args, kwargs, kernel_kind(name, problem),
                                                   arch, sixteen_bit)
            if config is None:
                rows.append(dict(kernel=name, variant=variant, failures=[
                    "no config fits: " + "; ".join(f"{_config_name(c)}: {r}"
                                                   for c, r in compiled.items())]))
                printer(f"| {name} | {variant} | no config fits |")
                continue
            row = dict(kernel=name, variant=variant, config=_config_name(config),
                       limit=SMEM_OPTIN[arch], **analyse(compiled, arch))
            row["failures"] = [r for r in [misfit(row, SMEM_OPTIN[arch])] if r]
            if sixteen_bit and row["spill_bytes"] > 0 and problem.head_dim <= 128:
                row["failures"].append(f"{row['spill_bytes']} spill bytes")
            if dump:
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"sm{arch}_{name}_{variant}.ptx"), "w") as f:
                    f.write(compiled.asm["ptx"])
            rows.append(row)
            printer(format_row(row))
    return rows


HEADER = ("| kernel | variant | config | shared B / limit | tmem cols | registers | spill bytes "
          "| wgmma | tcgen05 | mma.sync | TMA loads | inner-loop SASS instrs |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r):
    loops = ", ".join(str(n) for n in r["loop_instructions"]) or "-"
    return (f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['shared']} / {r['limit']} "
            f"| {r['tmem']} | {r['registers']} | {r['spill_bytes']} | {r['wgmma']} "
            f"| {r['tcgen05']} | {r['mma_sync']} | {r['tma_loads']} | {loops} |")


def _arch(text):
    digits = re.sub(r"[^0-9]", "", text)
    if not digits:
        raise argparse.ArgumentTypeError(f"--arch: expected e.g. sm90a or 90, got {text!r}")
    arch = int(digits)
    if arch not in SMEM_OPTIN:
        raise argparse.ArgumentTypeError(f"--arch: {text!r} is not one of SPEC section 13's "
                                         f"{['sm%d' % a for a in SMEM_OPTIN]}")
    return arch


# always in a sample: where the branch point's fit model crashed (fp32 dK/dV at head dim 256,
# bf16 dQ at head dim 128 with a float mask), and the tiles chosen at the edge of the register
# file (bf16 dK/dV at head dim 128: sm_90's 32 x 128 after 64 x 128 spills, sm_100's tcgen05
# 64 x 64; the gated forward at head dim 128: sm_120's 32 x 128 with 8 warps after five tiles
# that spill)
HARDEST = (("plain", "fp32", 256, "bwd_dkdv"), ("float_mask", "bf16", 128, "bwd_dq"),
           ("plain", "bf16", 128, "bwd_dkdv"), ("gate_bias", "bf16", 128, "fwd"),
           ("gate_bias", "bf16", 128, "bwd_dkdv"))  # (sm_90: the two-sweep dK/dV)


def _sample(tasks, n, seed):
    """n tasks: those of HARDEST, the rest drawn with `seed` and the architecture."""
    import random

    if n is None or n >= len(tasks):
        return tasks
    first = [t for t in tasks if t[1:] in HARDEST][:n]
    rest = [t for t in tasks if t not in first]
    draw = random.Random(seed * 1000 + tasks[0][0])  # each architecture draws its own
    return first + draw.sample(rest, max(n - len(first), 0))


def run_sweep(tasks, jobs=1, autotune_off=False, printer=print, ledger_dir=None, modes=None):
    """check_task over the tasks (in `jobs` processes), each in its mode (modes: task -> mode,
    default "compile"); returns the results, printed as they come (one line per task; a task
    checked from the ledger only where something is wrong)."""
    import concurrent.futures
    import functools

    check = functools.partial(_check_one, autotune_off=autotune_off, ledger_dir=ledger_dir)
    work = [(t, (modes or {}).get(t, "compile")) for t in tasks]
    results = []
    with concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else _Serial() as pool:
        for r in pool.map(check, work):  # printed as they come (in order)
            if r["mode"] != "ledger" or r["failures"] or r["uncovered"]:
                printer(format_task(r), flush=True)
            results.append(r)
    return results


def _check_one(item, autotune_off, ledger_dir):
    task, mode = item
    return check_task(task, autotune_off, ledger_dir, mode)


class _Serial:
    """ProcessPoolExecutor's map and context, in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


def format_task(r):
    what = f"sm{r['arch']} {r['kernel']} {r['family']} {r['dtype']} hd{r['dim']}"
    if r["uncovered"]:
        return (f"uncovered {what}: {len(r['uncovered'])} configs not in the ledger "
                f"({', '.join(r['uncovered'])})")
    kept = {row["config"]: row for row in r["rows"]}
    first = kept.get(r["kept"][0]) if r["kept"] else None
    limit = SMEM_OPTIN[r["arch"]]
    if first is None:
        summary = "declined (no config fits)" if not r["failures"] else "NO CONFIG"
    else:
        sources = {row["source"] for row in r["rows"]}
        how = "compiled" if sources == {"compiled"} else " + ".join(sorted(sources))
        summary = (f"{first['config']} shared {first['shared']}/{limit} tmem {first['tmem']} "
                   f"regs {first['registers']} spill {first['spill_bytes']} "
                   f"wgmma {first['wgmma']} tcgen05 {first['tcgen05']} mma.sync {first['mma_sync']}"
                   f" | kept {len(r['kept'])}/{len(r['rows'])} {how}"
                   + (f", {r['verified']} checked against the ledger" if r["verified"] else ""))
    status = "FAIL" if r["failures"] else "ok"
    return f"{status} {what}: {summary}" + "".join(f"\n    {f}" for f in r["failures"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=_arch, default=90,
                        help="one of sm80, sm86, sm89, sm90a (default), sm100a, sm120")
    parser.add_argument("--headline", action="store_true",
                        help="only the headline variants with their table (no sweep)")
    parser.add_argument("--dump", default=None, help="write each kernel's PTX into this folder")
    parser.add_argument("--features", nargs="?", const="all", default=None,
                        help="only compile one small problem per feature combination (fwd + "
                             "bwd): all, or a comma-separated list of names (no sweep)")
    parser.add_argument("--autotune-off", action="store_true",
                        help="sweep: compile each kernel's candidates only up to the first that "
                             "fits (the config with PEER_ATTENTION_TRITON_AUTOTUNE=0)")
    parser.add_argument("--sample", type=int, default=None,
                        help="sweep: this many (family, dtype, head dim, kernel) tasks: HARDEST, "
                             "the rest drawn at random (--seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default=None, help=f"sweep: some of {list(FAMILIES)}")
    parser.add_argument("--dtypes", default=None, help=f"sweep: some of {list(DTYPES)}")
    parser.add_argument("--dims", default=None, help=f"sweep: some of {list(HEAD_DIMS)}")
    parser.add_argument("--kernels", default=None, help=f"sweep: some of {list(KERNELS)}")
    parser.add_argument("--jobs", type=int, default=1, help="sweep: parallel processes")
    parser.add_argument("--json", nargs="?", const="-", default=None,
                        help="also write the rows as JSON (to this file; '-': one stdout line)")
    parser.add_argument("--ledger", default=None, metavar="DIR",
                        help="sweep: the compile ledger (DIR/smNN.tsv, module ledger): configs "
                             "it records are taken from it, the rest compiled; with --sample, "
                             "the sampled tasks are compiled and checked against it and the "
                             "others are checked from it alone")
    parser.add_argument("--update-ledger", action="store_true",
                        help="sweep: add what was compiled to the ledger (a whole sweep also "
                             "drops the rows it no longer compiles)")
    parser.add_argument("--require-ledger", action="store_true",
                        help="sweep: a task the ledger does not cover fails")
    opts = parser.parse_args(argv)
    from .utils import INTERPRET

    if INTERPRET:
        raise SystemExit("compile_check: unset TRITON_INTERPRET (it replaces the compiler)")
    if opts.headline or opts.features:
        rows = []
        if opts.headline:
            print(f"sm{opts.arch}: launch-faithful compile of the headline variants")
            print(HEADER)
            rows = report(opts.arch, opts.dump)
        if opts.features:
            problems = feature_problems()
            if opts.features != "all":
                names = opts.features.split(",")
                unknown = [n for n in names if n not in problems]
                if unknown:
                    parser.error(f"--features: unknown {unknown}, expected some of "
                                 f"{list(problems)}")
                problems = {n: problems[n] for n in names}
            print(HEADER)
            rows += report(opts.arch, opts.dump, problems=problems)
        print(f"compiled {len(rows)} kernels")
        _write_json(opts.json, rows)
        bad = [r for r in rows if r["failures"]]
        for r in bad:
            print(f"FAIL {r['kernel']} {r['variant']}: {'; '.join(r['failures'])}")
        return 1 if bad else 0

    def names(text, allowed, cast=str):
        if text is None:
            return None
        chosen = [cast(x) for x in text.split(",")]
        unknown = [x for x in chosen if x not in allowed]
        if unknown:
            parser.error(f"unknown {unknown}, expected some of {list(allowed)}")
        return chosen

    filtered = any(x is not None for x in (opts.families, opts.dtypes, opts.dims, opts.kernels))
    tasks = sweep_tasks(opts.arch, names(opts.families, FAMILIES), names(opts.dtypes, DTYPES),
                        names(opts.dims, HEAD_DIMS, int), names(opts.kernels, KERNELS))
    sampled = _sample(tasks, opts.sample, opts.seed)
    if (opts.update_ledger or opts.require_ledger) and not opts.ledger:
        parser.error("--update-ledger and --require-ledger need --ledger DIR")
    if opts.ledger is None:
        tasks, modes = sampled, None
    elif opts.sample is None:
        modes = {t: "cached" for t in tasks}
    else:
        modes = {t: "compile" if t in sampled else "ledger" for t in tasks}
    mode = "autotune-off config" if opts.autotune_off else "every candidate"
    print(f"sm{opts.arch}: {len(tasks)} kernel x dtype x head dim x family tasks, {mode}, "
          f"shared memory limit {SMEM_OPTIN[opts.arch]} B"
          + (f", ledger {ledger.path(opts.ledger, opts.arch)}"
             f" ({len(ledger.load(opts.ledger, opts.arch))} rows)" if opts.ledger else ""))
    results = run_sweep(tasks, opts.jobs, opts.autotune_off, ledger_dir=opts.ledger,
                        modes=modes)
    failures = sum(len(r["failures"]) for r in results)
    rows = [row for r in results for row in r["rows"]]
    compiled = sum(row["source"] == "compiled" for row in rows)
    uncovered = [r for r in results if r["uncovered"]]
    print(f"sm{opts.arch}: compiled {compiled} kernels, {failures} failures")
    if opts.ledger:
        print(f"sm{opts.arch}: {len(tasks)} tasks, {len(rows)} configs: {compiled} compiled "
              f"({sum(r['verified'] for r in results)} checked against the ledger), "
              f"{len(rows) - compiled} from the ledger; {len(uncovered)} tasks uncovered "
              f"({sum(len(r['uncovered']) for r in uncovered)} configs not in the ledger)")
        if uncovered:
            print(f"sm{opts.arch}: the ledger is stale or incomplete; refresh it (hours on two "
                  f"cores): python -m peer_attention.triton_kernels.compile_check --arch "
                  f"sm{opts.arch} --ledger {opts.ledger} --update-ledger --jobs N")
    if opts.update_ledger:
        book = dict(ledger.load(opts.ledger, opts.arch))
        if not (filtered or opts.sample is not None or opts.autotune_off):
            seen = {row["key"] for row in rows}  # a whole sweep: drop rows no compile has now
            book = {k: v for k, v in book.items() if k in seen}
        for r in results:
            task = (r["arch"], r["family"], r["dtype"], r["dim"], r["kernel"])
            for row in r["rows"]:
                if row["source"] == "compiled" and "error" not in row:
                    book[row["key"]] = ledger.row_of(row["key"], task, row["config"], row)
        print(f"sm{opts.arch}: ledger {ledger.save(opts.ledger, opts.arch, book)}: "
              f"{len(book)} rows")
    _write_json(opts.json, results)
    return 1 if failures or (opts.require_ledger and uncovered) else 0


def _write_json(path, rows):
    if path == "-":
        print(json.dumps(rows))
    elif path:
        with open(path, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
