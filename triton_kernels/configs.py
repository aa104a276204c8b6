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
TUNE_KEY = ["E_PAD", "EV_PAD", "BAND", "PEER_MODE", "TUNE_LEN"]


def interpreter_meta():
    return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK)


def tune_len(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


@functools.lru_cache(maxsize=None)
def _arch_and_smem(device_index: int):
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.major * 10 + props.minor, smem


def _candidates(backward: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for every architecture; the pruner
    keeps those meant for the device at hand (no CUDA query at import)."""
    if backward:  # the dK/dV kernel keeps two key-tile accumulators: smaller tiles
        blocks = [(64, 64), (128, 64), (64, 128), (32, 64), (64, 32), (32, 32)]
    else:
        blocks = [(128, 128), (128, 64), (64, 64), (64, 32), (128, 32), (32, 32)]
    return [(bm, bn, w, st) for bm, bn in blocks for w in (4, 8) for st in (1, 2, 3, 4)]


def _stages_for(arch: int, backward: bool):
    """Software-pipelining depths worth trying: Hopper (TMA/wgmma) pipelines deeper."""
    if backward:
        return (2, 3) if arch >= 90 else (1, 2)
    return (2, 3, 4) if arch >= 90 else (2, 3)


MAX_REGS_PER_THREAD = 192  # of the 255 a thread may hold: leave room for addresses and temps


def _fits(bm, bn, warps, stages, e_pad, ev_pad, elem, smem, backward):
    """Rough resource model. Shared memory: the streamed tiles (one per pipeline stage) plus the
    resident ones. Registers (32-bit words per thread): fp32 accumulators, the fp32 score tiles
    and the resident input tiles."""
    if backward:  # dK/dV: resident K/V tiles, streamed Q/dO tiles; dK, dV and two score tiles
        resident = bn * (e_pad + ev_pad) * elem
        streamed = max(stages, 1) * bm * (e_pad + ev_pad) * elem
        words = bn * (e_pad + ev_pad) + 2 * bm * bn + resident // 4
    else:  # forward-like: resident Q (and dO), streamed K/V tiles; the output and score tiles
        resident = bm * (e_pad + ev_pad) * elem
        streamed = max(stages, 1) * bn * (e_pad + ev_pad) * elem
        words = bm * ev_pad + bm * bn + bm * e_pad * elem // 4
    if resident + streamed > smem:
        return False
    return words <= MAX_REGS_PER_THREAD * 32 * warps


def autotune_configs(backward: bool = False):
    """All candidate configs; the pruning hook keeps those that fit (see prune)."""
    if INTERPRET:
        return [triton.Config(interpreter_meta(), num_warps=1, num_stages=1)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st)
            for bm, bn, w, st in _candidates(backward)]


def fitting_configs(configs, arch, smem, e_pad, ev_pad, elem, backward):
    """The configs meant for `arch` that fit its shared memory and registers, in the order
    autotune tries them (the compile report compiles the first)."""
    stages = _stages_for(arch, backward)
    kept = [c for c in configs
            if c.num_stages in stages
            and _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                      e_pad, ev_pad, elem, smem, backward)]
    if not kept:  # always leave the smallest one
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


def make_pruner(backward: bool):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs[:1]
        e_pad = kwargs.get("E_PAD", named_args.get("E_PAD"))
        ev_pad = kwargs.get("EV_PAD", named_args.get("EV_PAD"))
        q = named_args["Q"]
        arch, smem = _arch_and_smem(q.device.index if q.device.index is not None else 0)
        return fitting_configs(configs, arch, smem, e_pad, ev_pad, q.element_size(), backward)
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
