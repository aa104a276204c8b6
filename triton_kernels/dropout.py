"""The kernels' dropout keep mask, materialised (for tests and debugging only: the kernels
regenerate it tile by tile from the Philox seed and never store it)."""
from __future__ import annotations

import torch
import triton

from .configs import INTERPRETER_BLOCK
from .tiles import keep_mask_kernel
from .utils import INTERPRET, dropout_args


def dropout_keep_mask(problem) -> torch.Tensor:
    """Bool (B, Hq, Tq, Tk): True where the forward/backward kernels keep a weight."""
    q, k = problem.q, problem.k
    batch, num_q_heads, q_total = q.shape[:3]
    kv_total = k.shape[2]
    seed, rng_offset, dropout_p = dropout_args(problem)
    keep = torch.ones(batch, num_q_heads, q_total, kv_total, dtype=torch.uint8, device=q.device)
    if keep.numel() == 0 or dropout_p == 0:
        return keep.bool()
    block = INTERPRETER_BLOCK if INTERPRET else 64
    grid = (triton.cdiv(q_total, block), triton.cdiv(kv_total, block), batch * num_q_heads)
    keep_mask_kernel[grid](keep, seed, rng_offset, dropout_p, q_total, kv_total,
                           BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
