"""Launch configurations: per-architecture candidate lists autotuned on a GPU, one small config
under the interpreter (where timing means nothing and every extra config costs CI minutes).

Every kernel tiles queries by BLOCK_M and keys by BLOCK_N; E_PAD/EV_PAD are the padded head dims.
Which candidates fit is measured, not modelled: the pruner compiles each candidate for the
launching device exactly as the launch would (Triton's cache makes the launch's own compile a
lookup) and keeps those whose shared memory, tensor memory and body fit it (fit.misfit), and,
for 16-bit inputs, those that do not spill when any such fits. The compile report
(compile_check) runs the same selection for every architecture of SPEC section 13 without a
GPU, and checks NO_FIT, the table of what fits nowhere, from which the backend declines.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Optional

import torch
import triton

from .fit import ARCHS, MIN_ARCH, compile_launch, misfit, ptxas_resources, target, usage
from .utils import INTERPRET, TF32X3_DKDV_MAX_DIM, one_accumulator, padded_dim

# PEER_ATTENTION_TRITON_AUTOTUNE=0: each kernel runs the first candidate that fits the device
# (nothing is benchmarked; scripts/gpu_check.sh sets it so that compile time stays small)
AUTOTUNE_ENV = "PEER_ATTENTION_TRITON_AUTOTUNE"
INTERPRETER_BLOCK = 16
# partial buffers (gate/bias gradients) are indexed by query tile: size them for the smallest tile
MIN_BLOCK_M = INTERPRETER_BLOCK

# the autotune key: a power-of-two length bucket (so every new length does not re-tune) and every
# compile-time flag of the kernel (tune_key): each combination is its own kernel, with its own
# shared memory (a float mask's tile, the gate's accumulator), so a config kept for one never
# launches another that it may not fit
TUNE_KEY = ["TUNE_LEN"]


def tune_key(kernel):
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()
    return TUNE_KEY + [p.name for p in params if "constexpr" in str(p.annotation)
                       and p.name not in ("BLOCK_M", "BLOCK_N")]


def interpreter_meta():
    return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK)


def tune_len(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def table_arch(arch: int) -> int:
    """The architecture of SPEC section 13 whose candidates and limits a device takes: sm_87
    (Orin) as sm_80, sm_103/110 as sm_100, sm_121 as sm_120."""
    if arch >= 120:
        return 120
    if arch >= 100:
        return 100
    if arch >= 90:
        return 90
    return max((a for a in ARCHS if a <= arch), default=arch)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture and kernel kind, in the order
# autotune tries them; the first that fits is the config with autotuning off. Chosen from the
# compiled code (docs/triton_compile_report.md): no spills in 16-bit kernels at head dim <= 128,
# dK/dV with 64-128-query tiles where wgmma/tcgen05 take them, pipelined (num_stages >= 2)
# backward configs on sm_80/86/89. The small tiles at the end are what fp32 at head dim 256
# fits in.
_SMALL = [(32, 32, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1)]
_HOPPER = {
    "fwd": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3),
            (64, 128, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2)] + _SMALL,
    # at head dim 256 the gated joint forward keeps wgmma at 64 x 32 with 8 warps (254
    # registers, no spills) where 64 x 64 spills
    "fwd_two_acc": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
                    (64, 32, 8, 2), (64, 32, 4, 2)] + _SMALL,
    # with a float mask at head dim 128 every larger dQ tile spills; 64 x 32 with 8 warps does
    # not (wgmma on sm_90, tcgen05 on sm_100, mma.sync elsewhere) where 32 x 32 was left
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2),
           (64, 32, 4, 2)] + _SMALL,
    # dK/dV: keys are wgmma's M (S^T = K Q^T), queries its N. 64 queries x 128 keys (two
    # warpgroups of 64 keys, the FlashAttention-3 tile) keeps every product on wgmma without
    # spilling up to head dim 64; at head dim 128 dK and dV alone hold 128 fp32 registers a thread
    # and it spills (132-2316 B), so 32 x 128 (N = 32; plain attention) where 16 x 128 (N = 16)
    # ran before, then 64 x 64 (whose 64-key S^T both warpgroups compute) and 16 x 128 (causal,
    # variants); gated and peer mode 32 x 64 with 8 warps, a float mask 64 x 32 with 8 warps
    # (mma.sync) (docs/triton_compile_report.md, third pass). Causal 32 x 128 spills with two
    # stages, not with one: for autotune to weigh against 16 x 128's pipelining.
    # A fifth entry 2: dV and dK in two sweeps over the query tiles (one fp32 accumulator live
    # at a time, S^T and its exponentials computed twice). At head dim 128 gate/bias runs
    # 64 x 128 (one stage) and peer mode 32 x 128 (one stage) without spilling, where 32 x 64
    # ran; causal and the variants fit 32 x 128 too, but by the compiled loops not better than
    # 16 x 128 (126 vs 114, 246 vs 177 instructions per 1k pairs: softcap's tanh twice), so the
    # two-sweep tiles come after 16 x 128, for autotune to weigh (compile report, fourth pass)
    "dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (16, 128, 8, 2),
             (64, 128, 8, 2, 2), (64, 128, 8, 1, 2), (32, 128, 8, 2, 2), (32, 128, 8, 1, 2),
             (32, 128, 8, 1), (32, 64, 8, 2), (32, 64, 4, 2), (64, 32, 8, 2)] + _SMALL,
}
CANDIDATES = {
    90: _HOPPER,
    # tcgen05 runs dK/dV 64 x 64 at head dim 128 without spilling (236 registers, 512 tensor
    # memory columns); 128 x 128 needs 640 columns (a trap kernel). At head dim 256 dK and dV
    # alone take the 512 columns (32 x 64: 544, a trap): 64 x 32 with 8 warps (mma.sync, no
    # spills) rather than 32 x 32
    100: dict(_HOPPER, dkdv=[(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 2), (64, 32, 4, 2),
                             (16, 128, 8, 2), (32, 64, 4, 2)] + _SMALL),
    # sm_80/86/89/120 (mma.sync): 8 warps keep the backward's 64 x 64 tiles within registers
    # (4 warps spill 64-140 B at head dim 128), pipelined
    # the 8-warp forward tiles after the 4-warp ones: at head dim 128 with a float mask, gate/bias
    # or peer mode every 4-warp tile above 32 x 32 spills; 64 x 64 (gated) and 64 x 32 (float
    # mask) with 8 warps do not (sm_80: 255 / 244 registers), where 32 x 32 was kept
    80: {
        "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
                (128, 32, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2)] + _SMALL,
        "fwd_two_acc": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2),
                        (64, 64, 8, 2), (64, 32, 8, 2)] + _SMALL,
        "dq": [(64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 8, 2),
               (64, 32, 4, 2)] + _SMALL,
        "dkdv": [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 2), (32, 64, 4, 2),
                 (64, 32, 4, 2)] + _SMALL,
    },
}
CANDIDATES[86] = CANDIDATES[89] = CANDIDATES[120] = {
    "fwd": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2),
            (64, 32, 8, 2)] + _SMALL,
    # sm_120's ptxas spills every 64-row tile of the gated / peer-mode forward at head dim 128
    # (160-740 B); 32 x 128 and 32 x 64 with 8 warps do not (203-224 registers), where 32 x 32
    # with 4 warps was left
    "fwd_two_acc": [(64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2),
                    (32, 128, 8, 2), (32, 64, 8, 2)] + _SMALL,
    "dq": [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)] + _SMALL,
    # ptxas for sm_86/89 spills 64 x 64 x 2 stages at head dim 128 where sm_80's and sm_120's do
    # not: 64 x 32 (pipelined) and 64 x 64 (one stage) do not; with a float mask every larger
    # tile spills on sm_86/89 and 32 x 32 with 8 warps does not, where 16 x 32 was left
    "dkdv": [(64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 1), (32, 64, 8, 2), (32, 64, 4, 2),
             (64, 32, 4, 2), (32, 32, 8, 2)] + _SMALL,
}
KINDS = ("fwd", "fwd_two_acc", "dq", "dkdv")
# 16-bit inputs above head dim 128 on sm_100, tried before the lists above (tcgen05 where the
# lists' tiles fall back to mma.sync at 32 x 32 or smaller; compiled at head dim 256, bf16,
# docs/triton_compile_report.md, fifth pass):
# - dK/dV: dK and dV take tensor memory's 512 columns between them, so every one-sweep tile that
#   fits runs on mma.sync (64 x 32 with 8 warps, 16 x 32 gated); two sweeps (PHASES=2, one
#   accumulator live) keep tcgen05 at 64 x 64 and 32 x 64, one stage: 0 B spilled causal and in
#   peer mode, 92-200 B plain, variants and gate/bias, 752 B with a float mask; their full-tile
#   loops issue 185-277 SASS instructions per 1k pairs against mma.sync's 313-392;
# - forward (one accumulator): every 4-warp tile spills (156-1492 B), 64 x 64 and 64 x 32 with 8
#   warps do not (233-238 registers), where 32 x 32 with 4 warps and one stage was kept;
# - forward with two accumulators (gated joint, peer mode): 64 x 32 with 8 warps and one stage
#   spills 196 B in peer mode and 184 B gated in fp16 (342 B in bf16), where 16 x 32 with 4
#   warps ran.
WIDE_TILES = {100: {"dkdv": [(64, 64, 8, 1, 2), (32, 64, 8, 1, 2)],
                    "fwd": [(64, 64, 8, 2), (64, 32, 8, 2)],
                    "fwd_two_acc": [(64, 32, 8, 1)]}}
# There, spills up to this many bytes count as none: what else stays spill-free is mma.sync at
# 32 x 32 or smaller (dQ: 64 x 32 with 8 warps spills 212 B plain on tcgen05, 880-1292 B gated
# or with a float mask), and a few L1-resident local loads cost less than a quarter of the tile
WIDE_SPILL_ALLOWANCE = 256


def spill_allowance(arch: int, head_dim_pad: int) -> int:
    """Bytes of spill that select() counts as none for a kernel of this (padded) head dim on
    `arch` (16-bit inputs; every kernel kind alike)."""
    return WIDE_SPILL_ALLOWANCE if head_dim_pad > 128 and table_arch(arch) in WIDE_TILES else 0


# fp32 inputs: tiles of at most 64 x 64 (32 x 32 at head dim 256), at most 2 stages. Their
# operands take twice the bytes of 16-bit ones: the larger tiles measured either overflow
# shared memory or spill heavily (docs/triton_compile_report.md), and at head dim 256 a single
# fp32 compile takes ptxas minutes, so trying them only costs time.
FP32_MAX_TILE = {256: 32 * 32}
# fp32 dK/dV above head dim 128 (IEEE products, utils.f32_precision): 16 x 16, two stages, fits
# every architecture and family (at most 99,464 B, sm_90/100/120 with a float mask); ptxas
# spills 0-120 B plain, causal, variants or with a float mask, 3.9-5.3 KB gated or peer on
# sm_80/86/89 (one stage: 0-240 B and 12-20 KB); one stage (at most 81,920 B) after it. Measured
# and left out: 16 x 32 spills 4.8-7.8 KB plain (13-20 KB gated or peer) and does not fit sm_120
# (114,688 B through TMA) nor sm_86/89 with a float mask (102,400 B); 32 x 32 spills 76-118 KB.
FP32_WIDE_DKDV = [(16, 16, 4, 2), (16, 16, 4, 1)]


def candidates(arch: int, kind: str, element_size: int = 2, head_dim_pad: int = 64):
    listed = CANDIDATES[table_arch(arch)][kind]
    if element_size == 4:
        if kind == "dkdv" and head_dim_pad > TF32X3_DKDV_MAX_DIM:
            return FP32_WIDE_DKDV
        most = FP32_MAX_TILE.get(head_dim_pad, 64 * 64)
        return [c for c in listed if c[0] * c[1] <= most and c[3] <= 2]
    if head_dim_pad > 128:
        return WIDE_TILES.get(table_arch(arch), {}).get(kind, []) + listed
    return listed


def make_config(bm, bn, warps, stages, phases=1):
    """A candidate tuple's config; a fifth entry (dK/dV only) is the kernel's PHASES: 2 sweeps
    the query tiles twice, dV then dK (bwd._bwd_dkdv)."""
    kwargs = dict(BLOCK_M=bm, BLOCK_N=bn)
    if phases != 1:
        kwargs["PHASES"] = phases
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def blocks(config):
    """The candidate tuple of a config (make_config's arguments)."""
    phases = config.kwargs.get("PHASES", 1)
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages) + ((phases,) if phases != 1 else ())


def autotune_configs(kind: str = "fwd"):
    """Every candidate of a kernel kind on every architecture (the pruner keeps the launching
    device's); the forward's list covers both of its accumulator layouts."""
    if INTERPRET:
        return [triton.Config(interpreter_meta(), num_warps=1, num_stages=1)]
    kinds = ("fwd", "fwd_two_acc") if kind == "fwd" else (kind,)
    seen = {}
    for arch_lists in (*CANDIDATES.values(), *WIDE_TILES.values()):
        for k in kinds:
            for c in arch_lists.get(k, ()):
                seen.setdefault(c, make_config(*c))
    for c in FP32_WIDE_DKDV if kind == "dkdv" else ():
        seen.setdefault(c, make_config(*c))
    return list(seen.values())


def ordered_configs(configs, arch: int, kind: str, element_size: int = 2,
                    head_dim_pad: int = 64):
    """The configs meant for `arch`, the inputs' element size and (padded) head dim, in the
    order autotune tries them."""
    order = {c: i for i, c in enumerate(candidates(arch, kind, element_size, head_dim_pad))}
    return sorted((c for c in configs if blocks(c) in order), key=lambda c: order[blocks(c)])


def forward_kind(one_accumulator: bool) -> str:
    return "fwd" if one_accumulator else "fwd_two_acc"


def select(configs, measure, smem_limit: int, sixteen_bit: bool, first_only: bool,
           shortcut: bool = True, spill_ok: int = 0):
    """The configs (in order) that fit, measured by `measure(config)` -> usage dict (with
    "spills" where known); for 16-bit inputs the non-spilling ones (at most `spill_ok` bytes:
    spill_allowance) when any fits. With
    first_only, stop at the first that fits without spilling. With shortcut, the last (smallest)
    config is measured first: when it does not fit, none does (shared memory grows with the
    tiles and stages; compile_check's full sweep checks this). Returns (kept, {config:
    reason}) so that a caller can say why nothing fits."""
    measured = {}

    def use(i):
        if i not in measured:
            measured[i] = measure(configs[i])
        return measured[i]

    if shortcut and configs:
        reason = misfit(use(len(configs) - 1), smem_limit)
        if reason:
            return [], {configs[-1]: f"the smallest config does not fit: {reason}"}
    kept, spilling, rejected = [], [], {}
    for i, c in enumerate(configs):
        reason = misfit(use(i), smem_limit)
        if reason:
            rejected[c] = reason
        elif sixteen_bit and (use(i).get("spills") or 0) > spill_ok:
            spilling.append(c)
        else:
            kept.append(c)
            if first_only:
                break
    return (kept or spilling[:1 if first_only else None]), rejected


@functools.lru_cache(maxsize=None)
def device_limits(device_index: int):
    """(arch, opt-in shared memory per block) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.major * 10 + props.minor, smem


def measure_on_device(kernel, args, kwargs, config, arch: int, device_index: int) -> dict:
    """usage() of the launch compiled for the device, checked by loading it there (Triton's own
    load, which raises OutOfResources where the kernel's shared memory or tensor memory exceeds
    the device's), plus its spills (ptxas -v, as compile_check reads them)."""
    try:
        with torch.cuda.device(device_index):
            compiled = compile_launch(kernel, args, kwargs, config, target(arch))
            use = usage(compiled)
            if misfit(use, 1 << 30) is None:  # never load a trap kernel
                compiled._init_handles()
                use["spills"] = ptxas_resources(compiled, arch)[1]
        return use
    except triton.runtime.errors.OutOfResources as exc:
        return dict(shared=1 << 30, tmem=0, trap=False, error=str(exc))


def make_pruner(kernel, kind: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs[:1]
        q = named_args["Q"]
        index = q.device.index or 0  # CUDA tensors carry their index
        arch, smem = device_limits(index)
        this_kind = forward_kind(kwargs.get("ONE_ACC", True)) if kind == "fwd" else kind
        args = list(named_args.values())
        flags = {k: v for k, v in kwargs.items() if k in kernel.arg_names}  # not grid, warmup

        def measure(c):
            return measure_on_device(kernel, args, flags, c, arch, index)

        first_only = os.environ.get(AUTOTUNE_ENV, "1") == "0"  # one fixed config, no tuning
        dim = max(kwargs["E_PAD"], kwargs["EV_PAD"])
        kept, rejected = select(ordered_configs(configs, arch, this_kind, q.element_size(), dim),
                                measure, smem, q.element_size() == 2, first_only,
                                spill_ok=spill_allowance(arch, dim))
        if not kept:  # the backend declines such problems (NO_FIT): this is a stale table
            raise RuntimeError(
                f"peer_attention: no {this_kind} Triton config fits sm_{arch} ({smem} B shared "
                f"memory): " + "; ".join(f"{blocks(c)}: {r}" for c, r in rejected.items()))
        return kept
    return prune


def _zero_added_outputs(nargs, reset_only=False):
    """The dQ kernel adds a broadcast mask's gradient into its buffer (bwd.py, NEED_DMASK >= 2):
    zeroed before every config the autotuner runs and before the winner's run."""
    if nargs.get("NEED_DMASK", 0) >= 2:
        nargs["DMask"].zero_()


def tuned(kernel, kind: str = "fwd"):
    """kernel wrapped in triton.autotune (GPU), or the bare kernel (interpreter: the launcher
    passes interpreter_meta())."""
    if INTERPRET:
        return kernel
    return triton.autotune(
        configs=autotune_configs(kind),
        key=tune_key(kernel),
        prune_configs_by={"early_config_prune": make_pruner(kernel, kind)},
        pre_hook=_zero_added_outputs if kind == "dq" else None,
    )(kernel)


# What fits nowhere, measured by compile_check (which fails where nothing fits and this table
# does not decline): {arch: {(kernel kind, dtype, E_PAD): reason}}, for the family that needs the
# most (a family that fits is declined with it). The backend declines these problems. Empty
# since fp32 dK/dV above head dim 128 runs IEEE products at 16 x 16 (FP32_WIDE_DKDV), which
# fits sm_86/89/120 (with 3xTF32 products its smallest tile, 16 x 32, needed 147,456 B).
NO_FIT: dict = {}


def no_fit_reason(arch: int, kinds, dtype, e_pad: int, ev_pad: int) -> Optional[str]:
    table = NO_FIT.get(table_arch(arch), {})
    name = str(dtype).replace("torch.", "")
    for kind in kinds:
        dim = max(e_pad, ev_pad)
        reason = table.get((kind, name, dim))
        if reason:
            return f"{kind} at {name} head dim {dim} fits no config on sm_{arch} ({reason})"
    return None


def decline_reason(problem, device_index: int) -> Optional[str]:
    """Why the Triton kernels cannot run this problem on that CUDA device (None: they can)."""
    arch, _ = device_limits(device_index)
    if arch < MIN_ARCH:
        return (f"compute capability {arch // 10}.{arch % 10} < {MIN_ARCH // 10}.0 (no tensor-core "
                f"path for the kernels' dots)")
    if not NO_FIT.get(table_arch(arch)):
        return None
    kinds = [forward_kind(one_accumulator(problem))]
    if any(t is not None and t.requires_grad for t in (
            problem.q, problem.k, problem.v, problem.gate, problem.bias, problem.attn_mask)):
        kinds += ["dq", "dkdv"]
    return no_fit_reason(arch, kinds, problem.q.dtype, padded_dim(problem.head_dim),
                         padded_dim(problem.value_dim))
