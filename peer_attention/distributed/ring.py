"""Ring attention: the key/value shards of every stream travel around the ranks.

At step t rank r holds the keys/values that rank src = r - t (mod W) started with. Before the
step's compute it starts sending them on to rank r+1 (and receiving rank r-1's), so the transfer
overlaps the compute. The step's partial results (out, lse) over src's keys merge into fp32
accumulators by log-sum-exp ("peer" mode: per peer, one call per peer column so each partial
holds one peer's softmax).

Causal masks with shards: on a self pair the queries of r and the keys of src form a block of
the global mask: the diagonal block (src == r) is causal, blocks below it are full, blocks above
it are skipped (see layout.self_pattern; zigzag keeps half of each off-diagonal block). Cross
pairs are never causal, so when a self pair needs only part of a shard it gets its own call.
kv_lengths become per-shard counts (layout.shard_kv_lengths).

Backward: the same schedule; each partial's gradients come from the backward op given the merged
(out, lse) (the FlashAttention ring contract, see lowlevel.py). The keys/values rotate again,
together with their dK/dV accumulators, which end one more hop later back on their own rank.
Gate and bias gradients are summed over the group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..problem import PEER, AttentionProblem, lse_dtype
from . import layout as lay
from .comm import RingExchange, all_reduce_sum
from .lowlevel import problem_backward, problem_forward
from .merge import merge_into


@dataclass(frozen=True)
class RingPlan:
    group: object
    rank: int
    world: int
    layout: str
    q_local: Tuple[int, ...]      # per-stream shard lengths
    kv_local: Tuple[int, ...]
    peers: Tuple[int, ...]        # the S*S table, row-major
    is_causal: bool
    scale: float
    normalize: str
    kv_lengths: Optional[Tensor]  # global (B, S), on the device
    backend: str

    @property
    def num_streams(self) -> int:
        return len(self.q_local)


@dataclass(frozen=True)
class Piece:
    """One kernel call of a step: a peer table, the parts of the shards it reads, causal or not,
    and in "peer" mode the one peer column it serves."""
    table: Tuple[int, ...]
    q_part: str
    k_part: str
    causal: bool
    column: Optional[int]


def step_pieces(plan: RingPlan, src: int) -> List[Piece]:
    num = plan.num_streams
    q_part, k_part, causal = lay.self_pattern(plan.rank, src, plan.layout, plan.is_causal)
    columns = range(num) if plan.normalize == PEER else [None]
    pieces = []
    for col in columns:
        base = tuple(v if col is None or i % num == col else 0 for i, v in enumerate(plan.peers))
        if q_part == lay.ALL and k_part == lay.ALL:
            candidates = [(base, lay.ALL, lay.ALL, causal)]
        else:
            cross = tuple(v if i // num != i % num else 0 for i, v in enumerate(base))
            diagonal = tuple(v if i // num == i % num else 0 for i, v in enumerate(base))
            candidates = [(cross, lay.ALL, lay.ALL, False)]
            if q_part != lay.NONE:
                candidates.append((diagonal, q_part, k_part, False))
        pieces.extend(Piece(table, qp, kp, c, col) for table, qp, kp, c in candidates if any(table))
    return pieces


def _take(packed: Tensor, lens: Tuple[int, ...], layout: str, part: str):
    """The rows of `part` of every stream's shard: (tensor, per-stream lengths, row index or
    None for all rows)."""
    if part == lay.ALL:
        return packed, lens, None
    rows, new_lens, offset = [], [], 0
    for n in lens:
        begin, end = lay.part_range(n, layout, part)
        rows.append(torch.arange(offset + begin, offset + end, device=packed.device))
        new_lens.append(end - begin)
        offset += n
    index = torch.cat(rows)
    return packed.index_select(2, index), tuple(new_lens), index


def _piece_problem(plan: RingPlan, piece: Piece, src: int, q, k, v, gate, bias):
    q_p, q_lens, q_rows = _take(q, plan.q_local, plan.layout, piece.q_part)
    k_p, kv_lens, k_rows = _take(k, plan.kv_local, plan.layout, piece.k_part)
    v_p = v if k_rows is None else v.index_select(2, k_rows)
    kv_lengths = lay.shard_kv_lengths(plan.kv_lengths, plan.kv_local, src, plan.world,
                                      plan.layout, piece.k_part)
    problem = AttentionProblem(
        q=q_p, k=k_p, v=v_p, q_lens=q_lens, kv_lens=kv_lens, peers=piece.table, gate=gate,
        bias=bias, kv_lengths=kv_lengths, attn_mask=None, dropout_seed=None, dropout_p=0.0,
        is_causal=piece.causal, scale=plan.scale, normalize=plan.normalize)
    return problem, q_rows, k_rows


def _rows(t: Tensor, rows: Optional[Tensor], dim: int) -> Tensor:
    return t if rows is None else t.index_select(dim, rows)


def ring_forward(plan: RingPlan, q, k, v, gate, bias):
    """(out in q's dtype, lse, per-peer outputs or None) of the whole ring."""
    stats = lse_dtype(q.dtype)
    batch, heads, q_total, _ = q.shape
    value_dim, num = v.shape[-1], plan.num_streams
    peer_mode = plan.normalize == PEER
    acc_out = q.new_zeros(((num,) if peer_mode else ()) + (batch, heads, q_total, value_dim),
                          dtype=stats)
    lse_shape = (batch, heads, num, q_total) if peer_mode else (batch, heads, q_total)
    acc_lse = q.new_full(lse_shape, float("-inf"), dtype=stats)
    k_cur, v_cur = k, v
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        exchange = RingExchange([k_cur, v_cur], plan.group) if step + 1 < plan.world else None
        for piece in step_pieces(plan, src):
            problem, q_rows, _ = _piece_problem(plan, piece, src, q, k_cur, v_cur, gate, bias)
            out, lse = problem_forward(problem, plan.backend)
            if piece.column is None:
                merge_into(acc_out, acc_lse, out, lse, q_rows)
            else:
                col = piece.column
                merge_into(acc_out[col], acc_lse[:, :, col], out, lse[:, :, col], q_rows)
        if exchange is not None:
            k_cur, v_cur = exchange.wait()
    if peer_mode:
        return acc_out.sum(0).to(q.dtype), acc_lse, acc_out.to(q.dtype)
    return acc_out.to(q.dtype), acc_lse, None


def ring_backward(plan: RingPlan, needs, grad_out, q, k, v, gate, bias, out, lse, parts):
    """(dq, dk, dv, dgate, dbias) of the ring; None where not needed."""
    need_q, need_k, need_v, need_gate, need_bias = needs
    need_kv = need_k or need_v
    stats = lse_dtype(q.dtype)
    op_needs = [need_q, need_k, need_v, need_gate, need_bias, False, False]
    dq = torch.zeros(q.shape, dtype=stats, device=q.device) if need_q else None
    dgate = torch.zeros(gate.shape, dtype=stats, device=q.device) if need_gate else None
    dbias = torch.zeros(bias.shape, dtype=stats, device=q.device) if need_bias else None
    k_cur, v_cur = k, v
    dkv_exchange = None
    dk_acc = dv_acc = None
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        exchange = RingExchange([k_cur, v_cur], plan.group) if step + 1 < plan.world else None
        dk_part = torch.zeros(k.shape, dtype=stats, device=k.device) if need_kv else None
        dv_part = torch.zeros(v.shape, dtype=stats, device=v.device) if need_kv else None
        for piece in step_pieces(plan, src):
            problem, q_rows, k_rows = _piece_problem(plan, piece, src, q, k_cur, v_cur, gate, bias)
            given_out = out if piece.column is None else parts[piece.column]
            grads = problem_backward(problem, plan.backend, _rows(grad_out, q_rows, 2),
                                     _rows(given_out, q_rows, 2), _rows(lse, q_rows, lse.dim() - 1),
                                     op_needs)
            if need_q:
                _add_rows(dq, grads[0], q_rows)
            if need_k:
                _add_rows(dk_part, grads[1], k_rows)
            if need_v:
                _add_rows(dv_part, grads[2], k_rows)
            if need_gate:
                dgate += grads[3]
            if need_bias:
                dbias += grads[4]
        if need_kv:
            if dkv_exchange is None:
                dk_acc, dv_acc = dk_part, dv_part
            else:  # the accumulators of src's shard, from the previous rank
                dk_in, dv_in = dkv_exchange.wait()
                dk_acc, dv_acc = dk_in + dk_part, dv_in + dv_part
            if plan.world > 1:  # on to the next rank; after the last step: home
                dkv_exchange = RingExchange([dk_acc, dv_acc], plan.group)
        if exchange is not None:
            k_cur, v_cur = exchange.wait()
    if need_kv and dkv_exchange is not None:
        dk_acc, dv_acc = dkv_exchange.wait()
    dgate = all_reduce_sum(dgate, plan.group)
    dbias = all_reduce_sum(dbias, plan.group)
    return (
        dq.to(q.dtype) if need_q else None,
        dk_acc.to(k.dtype) if need_k else None,
        dv_acc.to(v.dtype) if need_v else None,
        dgate.to(gate.dtype) if need_gate else None,
        dbias.to(bias.dtype) if need_bias else None,
    )


def _add_rows(acc: Tensor, grad: Tensor, rows: Optional[Tensor]) -> None:
    if rows is None:
        acc += grad
    else:
        acc.index_add_(2, rows, grad.to(acc.dtype))


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, bias, plan: RingPlan):
        out, lse, parts = ring_forward(plan, q, k, v, gate, bias)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, gate, bias, out, lse, parts)
        return out

    @staticmethod
    @once_differentiable  # the backward ops have no derivative of their own
    def backward(ctx, grad_out):
        q, k, v, gate, bias, out, lse, parts = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        grads = ring_backward(ctx.plan, needs, grad_out, q, k, v, gate, bias, out, lse, parts)
        return (*grads, None)
