"""Host side of the attention kernels' launches: the one place their arguments are assembled,
shared by the forward (fwd.forward_launch), the backward (bwd.backward_launches), the decode
kernels (scale_args) and the compile report (compile_check). A launch is compiled without a GPU
by fit.compile_launch, through Triton's own binder (fit.bind).

The kernels take their arguments in bundles (Triton jit functions accept tuples, specialised
element by element as separate arguments would be: a stride of 1 becomes a constant, a multiple
of 16 is marked divisible):
  * `F`, a `Flags` named tuple of the compile-time feature flags every kernel of the family shares
    (a constexpr argument: each combination is its own kernel and its own autotune key);
  * one strides tuple per tensor, in the tensor's dimension order;
  * `tables`: the int32 stream/tile/peer tables of the packed problem;
  * `optional`: the optional inputs (gate, bias, kv_lengths, mask, alibi, sinks) and
    `opt_strides`, their strides (zeros for absent inputs, which their flags keep unread);
  * `rng` (seed, offset, p), `scales` (scale_log2, softcap_scale) and `sizes` (heads, streams,
    lengths, head dims, band).
Flags a launch or the autotuner sets on its own (USE_TMA, MASK_TMA, ONE_ACC, NEED_*, E_PAD,
EV_PAD, BLOCK_M, BLOCK_N) stay separate constexpr arguments: the pruner and the compile report
read or set them by name.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from .configs import interpreter_meta, tune_len
from .utils import (INTERPRET, band, dropout_args, mask_for_kernel, mask_kind, padded_dim,
                    search_steps, strides_or_zero, tma_ok, f32_dot)
from .utils import one_accumulator  # noqa: F401  (re-exported: the launch layer's view)


class Flags(NamedTuple):
    """The compile-time feature flags of a problem, shared by the forward and backward kernels
    (the kernels read them as F.HAS_GATE, ...)."""
    HAS_GATE: bool
    HAS_BIAS: bool
    HAS_KVLEN: bool
    MASK_KIND: int  # utils.MASK_NONE / MASK_BOOL / MASK_FLOAT
    BAND: bool  # a window or causal band on the self pair
    BOTTOM_RIGHT: bool
    SOFTCAP: bool
    HAS_ALIBI: bool
    HAS_SINKS: bool
    DIAGONAL: bool  # the diagonal (varlen) peer table: p = s, no lists
    PEER_MODE: bool  # normalize == "peer"
    HAS_DROPOUT: bool
    F32_DOT: int  # utils.f32_dot: 0 (16-bit products), 1 3xTF32, 2 IEEE
    BF16_RTNE: bool  # round fp32 -> bf16 to nearest even (the interpreter truncates)


def kernel_flags(problem) -> Flags:
    left, right = band(problem)
    return Flags(
        HAS_GATE=problem.gate is not None,
        HAS_BIAS=problem.bias is not None,
        HAS_KVLEN=problem.kv_lengths is not None,
        MASK_KIND=mask_kind(problem.attn_mask),
        BAND=left >= 0 or right >= 0,
        BOTTOM_RIGHT=bool(problem.bottom_right),
        SOFTCAP=problem.softcap > 0,
        HAS_ALIBI=problem.alibi_slopes is not None,
        HAS_SINKS=problem.sinks is not None,
        DIAGONAL=problem.diagonal_peers,
        PEER_MODE=problem.normalize == "peer",
        HAS_DROPOUT=problem.dropout_p > 0,
        F32_DOT=f32_dot(problem.q.dtype, padded_dim(problem.head_dim),
                              padded_dim(problem.value_dim)),
        BF16_RTNE=INTERPRET and problem.q.dtype == torch.bfloat16,
    )


def head_dims(problem) -> dict:
    """E_PAD / EV_PAD: the head dims padded (in registers) to a power of two."""
    return dict(E_PAD=padded_dim(problem.head_dim), EV_PAD=padded_dim(problem.value_dim))


def meta() -> dict:
    """The tile sizes a launch passes itself: the interpreter's (no autotuning there)."""
    return interpreter_meta() if INTERPRET else {}


def scale_args(softcap: float, scale: float):
    """(scale_log2, softcap_scale): with softcap z = c * tanh(scale * q.k / c), so the log2
    multiplier is c * log2(e) and tanh's argument is q.k * scale / c."""
    if softcap > 0:
        return softcap * 1.4426950408889634, scale / softcap
    return scale * 1.4426950408889634, 0.0


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _device_allocator(size: int, alignment: int, stream):
    """Global scratch for on-device tensor descriptors (triton.set_allocator), called during a
    launch: on the current device, which the launch guard (utils.launch_device) makes the
    inputs'."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def use_tma(problem, out) -> bool:
    q = problem.q
    if not tma_ok(q, problem.k, problem.v, out):
        return False
    if INTERPRET:
        return True
    if q.device.type != "cuda" or not _has_tma(q.device.index or 0):
        return False
    triton.set_allocator(_device_allocator)
    return True


def mask_tma_ok(mask) -> bool:
    """The attn_mask through a descriptor: keys contiguous, rows 16-byte aligned and not
    broadcast (a stride-0 query dim is read through pointers)."""
    if mask is None:
        return False
    size = mask.element_size()
    return (mask.stride(-1) == 1 and mask.stride(-2) > 0 and mask.data_ptr() % 16 == 0
            and all((st * size) % 16 == 0 for st in mask.stride()[:-1]))


def num_row_tiles(problem, block_m: int) -> int:
    """Query tiles of the longest stream (the per-tile partial buffers of the backward)."""
    return triton.cdiv(max(problem.q_lens), block_m) if problem.q_lens else 0


def strides(t, ndim: int):
    """The first `ndim` strides of a tensor as one kernel argument (zeros for an absent or empty
    buffer)."""
    return tuple(t.stride())[:ndim] if t is not None and t.numel() else (0,) * ndim


class Common(NamedTuple):
    """The arguments every kernel of the family takes, in this order after its own tensors."""
    tables: tuple
    optional: tuple
    rng: tuple
    scales: tuple
    q_strides: tuple
    k_strides: tuple
    v_strides: tuple
    lse_strides: tuple
    opt_strides: tuple
    sizes: tuple


def common_args(problem, tables: tuple, lse) -> Common:
    """The shared bundles of a launch over the packed problem (`tables`: the kernel's own
    selection of utils.stream_tables, the first of which also stands in for absent inputs)."""
    q, k, v = problem.q, problem.k, problem.v
    mask = mask_for_kernel(problem.attn_mask)
    dummy = tables[0]
    optional = tuple(t if t is not None else dummy for t in (
        problem.gate, problem.bias, problem.kv_lengths, mask, problem.alibi_slopes,
        problem.sinks))
    opt_strides = (strides_or_zero(problem.gate, 5), strides_or_zero(problem.bias, 4),
                   strides_or_zero(problem.kv_lengths, 2), strides_or_zero(mask, 4),
                   strides_or_zero(problem.alibi_slopes, 2))
    peer_mode = problem.normalize == "peer"
    num_q_heads, num_streams = q.shape[1], problem.num_streams
    left, right = band(problem)
    sizes = (num_q_heads, num_q_heads // problem.num_kv_heads, num_streams,
             search_steps(num_streams), q.shape[2], k.shape[2], problem.head_dim,
             problem.value_dim, left, right)
    return Common(
        tables=tables, optional=optional, rng=dropout_args(problem),
        scales=scale_args(problem.softcap, problem.scale), q_strides=tuple(q.stride()),
        k_strides=tuple(k.stride()), v_strides=tuple(v.stride()),
        lse_strides=(lse.stride(0), lse.stride(1), lse.stride(2) if peer_mode else 0),
        opt_strides=opt_strides, sizes=sizes)


def tune_len_of(problem) -> int:
    """TUNE_LEN, the autotune key's length bucket."""
    return tune_len(max(max(problem.q_lens), max(problem.kv_lens)))

