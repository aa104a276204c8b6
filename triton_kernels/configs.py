"""Launch configurations: autotuned per architecture on a GPU, one small config under the
interpreter (where timing means nothing and every extra config costs CI minutes).

Every kernel tiles queries by BLOCK_M and keys by BLOCK_N; E_PAD/EV_PAD are the padded head dims.
Configs that cannot fit the device's shared memory or registers are pruned before tuning.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from .utils import INTERPRET

# PEER_ATTENTION_TRITON_AUTOTUNE=0: each kernel runs the first candidate that fits the device
# (nothing is benchmarked; scripts/gpu_check.sh sets it so that compile time stays small)
AUTOTUNE_ENV = "PEER_ATTENTION_TRITON_AUTOTUNE"
INTERPRETER_BLOCK = 16
# partial buffers (gate/bias gradients) are indexed by query tile: size them for the smallest tile
MIN_BLOCK_M = INTERPRETER_BLOCK

# the autotune key: padded head dims, the features that change the loop structure, and a
# power-of-two length bucket (so every new length does not re-tune)
TUNE_KEY = ["E_PAD", "EV_PAD", "BAND", "PEER_MODE", "ONE_ACC", "TUNE_LEN"]


def interpreter_meta():
    return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK)


def tune_len(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


@functools.lru_cache(maxsize=None)
def _arch_and_smem(device_index: int):
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.major * 10 + props.minor, smem


# (BLOCK_M, BLOCK_N, num_warps) per kernel kind, in the order autotune tries them. The first of
# each is the one the sm90 compile report (compile_check --headline) shows to run without
# spilling at head dim 128: the forward with two accumulators (per-peer partials, gated joint or
# "peer" mode) takes 64-key tiles, dQ 128x64 (two score tiles live), and dK/dV 16 queries x 128
# keys (its resident K, V, dK, dV take most registers).
CANDIDATES = {
    "fwd": [(128, 128, 8), (128, 64, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4), (128, 32, 4),
            (64, 32, 4), (32, 32, 4)],
    "fwd_two_acc": [(128, 64, 8), (64, 64, 4), (128, 128, 8), (64, 128, 4), (64, 32, 4),
                    (32, 32, 4)],
    "dq": [(128, 64, 8), (64, 64, 4), (64, 128, 8), (128, 128, 8), (64, 32, 4), (32, 64, 4),
           (32, 32, 4)],
    "dkdv": [(16, 128, 8), (16, 64, 4), (32, 128, 8), (64, 64, 8), (32, 64, 4), (128, 64, 8),
             (64, 128, 8), (32, 32, 4)],
}
KINDS = tuple(CANDIDATES)


def _stages_for(arch: int, kind: str):
    """Software-pipelining depths worth trying: Hopper (TMA/wgmma) pipelines deeper."""
    if kind in ("dq", "dkdv"):
        return (2, 3) if arch >= 90 else (1, 2)
    return (2, 3, 4) if arch >= 90 else (2, 3)


MAX_REGS_PER_THREAD = 224  # of the 255 a thread may hold: leave room for addresses and temps


def _fits(bm, bn, warps, stages, e_pad, ev_pad, elem, smem, kind):
    """Rough resource model. Shared memory: the streamed tiles (one per pipeline stage) plus the
    resident ones. Registers (32-bit words per thread): fp32 accumulators, the fp32 score tiles
    and the resident input tiles (16-bit inputs pack two to a register)."""
    if kind == "dkdv":  # resident K/V tiles, streamed Q/dO tiles; dK, dV and two score tiles
        resident = bn * (e_pad + ev_pad) * elem
        streamed = max(stages, 1) * bm * (e_pad + ev_pad) * elem
        words = bn * (e_pad + ev_pad) + 2 * bm * bn + resident // 4
    else:  # forward-like: resident Q (and dO), streamed K/V tiles; the output and score tiles
        resident = bm * (e_pad + ev_pad) * elem
        streamed = max(stages, 1) * bn * (e_pad + ev_pad) * elem
        accumulators = 2 if kind == "fwd_two_acc" else 1
        score_tiles = 2 if kind == "dq" else 1
        words = (accumulators * bm * max(e_pad, ev_pad) + score_tiles * bm * bn
                 + bm * e_pad * elem // 4)
    if resident + streamed > smem:
        return False
    return words <= MAX_REGS_PER_THREAD * 32 * warps


def autotune_configs(kind: str = "fwd"):
    """All candidate configs of a kernel kind; the pruning hook keeps those that fit (see
    prune). The forward's list covers both of its accumulator layouts."""
    if INTERPRET:
        return [triton.Config(interpreter_meta(), num_warps=1, num_stages=1)]
    kinds = ("fwd", "fwd_two_acc") if kind == "fwd" else (kind,)
    seen, configs = set(), []
    for k in kinds:
        for bm, bn, w in CANDIDATES[k]:
            for st in (1, 2, 3, 4):
                if (bm, bn, w, st) not in seen:
                    seen.add((bm, bn, w, st))
                    configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w,
                                                 num_stages=st))
    return configs


def fitting_configs(configs, arch, smem, e_pad, ev_pad, elem, kind):
    """The configs meant for `arch` that fit its shared memory and registers, in the order
    autotune tries them (the compile report compiles the first)."""
    stages = _stages_for(arch, kind)
    order = {blocks: i for i, blocks in enumerate(CANDIDATES[kind])}

    def blocks(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)

    kept = [c for c in configs
            if blocks(c) in order and c.num_stages in stages
            and _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                      e_pad, ev_pad, elem, smem, kind)]
    kept.sort(key=lambda c: (order[blocks(c)], stages.index(c.num_stages)))
    if not kept:  # always leave the smallest one
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


def forward_kind(one_accumulator: bool) -> str:
    return "fwd" if one_accumulator else "fwd_two_acc"


def make_pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs[:1]
        e_pad = kwargs.get("E_PAD", named_args.get("E_PAD"))
        ev_pad = kwargs.get("EV_PAD", named_args.get("EV_PAD"))
        q = named_args["Q"]
        arch, smem = _arch_and_smem(q.device.index if q.device.index is not None else 0)
        this_kind = forward_kind(kwargs.get("ONE_ACC", True)) if kind == "fwd" else kind
        kept = fitting_configs(configs, arch, smem, e_pad, ev_pad, q.element_size(), this_kind)
        if os.environ.get(AUTOTUNE_ENV, "1") == "0":  # one fixed config: no tuning (GPU tests)
            kept = kept[:1]
        return kept
    return prune


def tuned(kernel, kind: str = "fwd"):
    """kernel wrapped in triton.autotune (GPU), or the bare kernel (interpreter: the launcher
    passes interpreter_meta())."""
    if INTERPRET:
        return kernel
    return triton.autotune(
        configs=autotune_configs(kind),
        key=TUNE_KEY,
        prune_configs_by={"early_config_prune": make_pruner(kind)},
    )(kernel)
