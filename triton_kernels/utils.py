"""Host-side helpers shared by the launchers: interpreter flag, dtype and shape helpers."""
from __future__ import annotations

import os

import torch
import triton

# Read once, like triton itself: TRITON_INTERPRET must be set before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# attn_mask kinds (a compile-time flag of the kernels)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

MIN_DIM_PAD = 16  # tl.dot needs every dimension >= 16


def padded_dim(n: int) -> int:
    """Head dims are padded in registers (masked loads) to a power of two, never in memory."""
    return max(MIN_DIM_PAD, triton.next_power_of_2(max(n, 1)))


def use_f32_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs need an IEEE fp32 product (not TF32); under the interpreter bf16 dots are
    wrong, so every product is done in fp32 there."""
    return INTERPRET or dtype == torch.float32


def mask_kind(mask) -> int:
    if mask is None:
        return MASK_NONE
    return MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT


def mask_for_kernel(mask):
    """A bool mask is read as bytes (same strides, no copy)."""
    if mask is not None and mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return mask


def strides_or_zero(t, ndim: int):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def stream_tables(problem, device):
    """Prefix offsets of the packed streams and the flat peer table, as int32 device tensors."""
    q_offsets = problem.stream_offsets(problem.q_lens)
    kv_offsets = problem.stream_offsets(problem.kv_lens)
    q_off = torch.tensor(q_offsets, dtype=torch.int32, device=device)
    kv_off = torch.tensor(kv_offsets, dtype=torch.int32, device=device)
    peers = torch.tensor(list(problem.peers), dtype=torch.int32, device=device)
    return q_off, kv_off, peers


def dropout_args(problem):
    """(seed, offset, p) for the in-kernel Philox generator; zeros when there is no dropout."""
    if problem.dropout_p > 0 and problem.dropout_seed is not None:
        seed, offset = (int(x) for x in problem.dropout_seed.tolist())
        # tl.rand takes a 32/64-bit seed; keep it and the offset in the positive int63 range
        return seed & ((1 << 62) - 1), offset & ((1 << 40) - 1), float(problem.dropout_p)
    return 0, 0, 0.0
