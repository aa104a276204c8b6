"""Ulysses attention: all-to-all from sequence shards to head shards and back.

Each rank sends head group j of its sequence shard to rank j, so that rank j holds all positions
of every stream for heads [j*Hq/W, (j+1)*Hq/W) (key/value heads [j*H/W, (j+1)*H/W); GQA's head
mapping is preserved). The local kernel then runs on full sequences, with no change to causal
masks or kv_lengths, and its output goes back by the inverse all-to-all. The backward is autograd
through the same steps (an all-to-all is its own adjoint); gate and bias are sliced per head group
and their gradients summed over the group.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import entry
from ..problem import AttentionProblem
from . import layout as lay
from .comm import AllToAll, SumGradOverGroup


def check_heads(num_q_heads: int, num_kv_heads: int, world: int) -> None:
    for label, heads in (("queries (Hq)", num_q_heads), ("keys/values (H)", num_kv_heads)):
        if heads % world:
            raise ValueError(
                f"method='ulysses': the number of heads of {label} must be divisible by the "
                f"group size {world}, got {heads}; use method='ring'")


def _order(local_lens: Tuple[int, ...], world: int, layout: str, device) -> Tensor:
    """Index of the rank-major received rows (rank j's packed shard is block j) that gives the
    streams' full sequences, packed, in global order."""
    block = sum(local_lens)
    index, offset = [], 0
    for n in local_lens:
        rows, positions = [], []
        for rank in range(world):
            local = 0
            for start, length in lay.segments(n * world, rank, world, layout):
                rows.append(torch.arange(length) + rank * block + offset + local)
                positions.append(torch.arange(start, start + length))
                local += length
        rows, positions = torch.cat(rows), torch.cat(positions)
        index.append(rows[torch.argsort(positions)])
        offset += n
    return torch.cat(index).to(device)


def _seq_to_heads(x: Tensor, order: Tensor, world: int, group) -> Tensor:
    batch, heads, rows, dim = x.shape
    x = x.reshape(batch, world, heads // world, rows, dim).transpose(0, 1)
    y = AllToAll.apply(x, group)  # y[j]: rank j's rows of this rank's heads
    y = y.permute(1, 2, 0, 3, 4).reshape(batch, heads // world, world * rows, dim)
    return y.index_select(2, order)


def _heads_to_seq(y: Tensor, inverse: Tensor, world: int, group) -> Tensor:
    batch, heads, total, dim = y.shape
    rows = total // world
    y = y.index_select(2, inverse).reshape(batch, heads, world, rows, dim).permute(2, 0, 1, 3, 4)
    x = AllToAll.apply(y, group)  # x[j]: this rank's rows of rank j's heads
    return x.permute(1, 0, 2, 3, 4).reshape(batch, heads * world, rows, dim)


def _head_slice(t: Optional[Tensor], dim: int, rank: int, heads: int, group) -> Optional[Tensor]:
    if t is None:
        return None
    if t.requires_grad:
        t = SumGradOverGroup.apply(t, group)
    return t.narrow(dim, rank * heads, heads)


def ulysses_attention(problem: AttentionProblem, *, group, rank: int, world: int, layout: str,
                      backend: str, kv_lengths: Optional[Tensor]) -> Tensor:
    """This rank's packed output shard (B, Hq, sum L_s/W, Ev), differentiable."""
    check_heads(problem.num_q_heads, problem.num_kv_heads, world)
    device = problem.q.device
    q_order = _order(problem.q_lens, world, layout, device)
    kv_order = _order(problem.kv_lens, world, layout, device)
    q = _seq_to_heads(problem.q, q_order, world, group)
    k = _seq_to_heads(problem.k, kv_order, world, group)
    v = _seq_to_heads(problem.v, kv_order, world, group)
    q_heads = problem.num_q_heads // world
    gate = _head_slice(problem.gate, 3, rank, q_heads, group)
    bias = _head_slice(problem.bias, 3, rank, q_heads, group)
    local = problem._replace(
        q=q, k=k, v=v, q_lens=tuple(n * world for n in problem.q_lens),
        kv_lens=tuple(n * world for n in problem.kv_lens), gate=gate, bias=bias,
        kv_lengths=kv_lengths)
    out, _lse = entry.forward(local, backend)
    return _heads_to_seq(out, torch.argsort(q_order), world, group)
