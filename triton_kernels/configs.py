"""Launch configurations: autotuned per architecture on a GPU, one small config under the
interpreter (where timing means nothing and every extra config costs CI minutes).

Every kernel tiles queries by BLOCK_M and keys by BLOCK_N; E_PAD/EV_PAD are the padded head dims.
Configs that cannot fit the device's shared memory or registers are pruned before tuning.
"""
from __future__ import annotations

import functools

import torch
import triton

from .utils import INTERPRET

INTERPRETER_BLOCK = 16
# partial buffers (gate/bias gradients) are indexed by query tile: size them for the smallest tile
MIN_BLOCK_M = INTERPRETER_BLOCK

# the autotune key: padded head dims, the features that change the loop structure, and a
# power-of-two length bucket (so every new length does not re-tune)
TUNE_KEY = ["E_PAD", "EV_PAD", "IS_CAUSAL", "PEER_MODE", "TUNE_LEN"]


def interpreter_meta():
    return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK)


def tune_len(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


@functools.lru_cache(maxsize=None)
def _arch_and_smem(device_index: int):
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.major * 10 + props.minor, smem


def _candidates(arch: int, backward: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tried on this architecture."""
    if backward:  # the dK/dV kernel keeps two key-tile accumulators: smaller tiles
        blocks = [(64, 64), (128, 64), (64, 128), (32, 64), (64, 32), (32, 32)]
        stages = [2, 3] if arch >= 90 else [1, 2]
    else:
        blocks = [(128, 128), (128, 64), (64, 64), (64, 32), (128, 32), (32, 32)]
        stages = [2, 3, 4] if arch >= 90 else [2, 3]
    warps = [4, 8]
    return [(bm, bn, w, st) for bm, bn in blocks for w in warps for st in stages]


def _fits(bm, bn, warps, stages, e_pad, ev_pad, elem, smem, backward):
    """Rough resource model: streamed K/V tiles per stage plus the resident Q/O tiles in shared
    memory; the fp32 accumulators in registers (at most ~128 fp32 per thread of 32*warps)."""
    resident = bm * (e_pad + ev_pad) * elem
    streamed = max(stages, 1) * bn * (e_pad + ev_pad) * elem
    if backward:
        resident = bn * (e_pad + ev_pad) * elem
        streamed = max(stages, 1) * bm * (e_pad + ev_pad) * elem + bm * bn * 4
    acc_regs = (bn if backward else bm) * (e_pad + ev_pad) + bm * bn
    if resident + streamed > smem:
        return False
    if acc_regs > 128 * 32 * warps:
        return False
    if bm * bn >= 128 * 128 and warps < 8:
        return False
    return True


def autotune_configs(backward: bool = False):
    """All candidate configs; the pruning hook keeps those that fit (see prune)."""
    if INTERPRET:
        return [triton.Config(interpreter_meta(), num_warps=1, num_stages=1)]
    arch = 90
    if torch.cuda.is_available():
        arch, _ = _arch_and_smem(torch.cuda.current_device())
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st)
            for bm, bn, w, st in _candidates(arch, backward)]


def make_pruner(backward: bool):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs[:1]
        e_pad = kwargs.get("E_PAD", named_args.get("E_PAD"))
        ev_pad = kwargs.get("EV_PAD", named_args.get("EV_PAD"))
        q = named_args["Q"]
        _, smem = _arch_and_smem(q.device.index if q.device.index is not None else 0)
        elem = q.element_size()
        kept = [c for c in configs
                if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                         e_pad, ev_pad, elem, smem, backward)]
        if not kept:  # always leave the smallest one
            kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept
    return prune


def tuned(kernel, backward: bool = False):
    """kernel wrapped in triton.autotune (GPU), or the bare kernel (interpreter: the launcher
    passes interpreter_meta())."""
    if INTERPRET:
        return kernel
    return triton.autotune(
        configs=autotune_configs(backward),
        key=TUNE_KEY,
        prune_configs_by={"early_config_prune": make_pruner(backward)},
    )(kernel)
