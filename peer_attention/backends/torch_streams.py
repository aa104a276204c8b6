"""The `torch` backend on the caller's own streams, in plain eager mode (issue 20).

A peer_attention call that the `torch` backend serves with its fused plan (joint mode, see
torch_fused.py) or with the per-peer softmax is computed here as the composition a user writes
without this package, on the q/k/v streams as the caller passed them:

  joint   one kernel call per query stream over the concatenated keys of its peers, the gate
          folded into the values (cat_p g[s,p] * v_p), bias and kv_lengths as additive key rows,
          a causal self pair as its block; one call on the packed q, k, v when every stream sees
          every key with nothing per pair (torch.cat + one SDPA + split)
  peer    one kernel call per attended pair, O_s = sum_p g[s,p] * o_sp (in float32 for 16-bit
          inputs, rounded once)

Nothing is packed that the composition does not pack: the queries of a per-stream call are the
caller's tensor, the outputs are the kernels' own. Autograd is torch's for every op but the kernel
calls (cat, the gate's product, the sums: C++ nodes, no Python in the backward); each kernel call is
one KernelCall, whose backward is the kernel's backward and, under create_graph=True, the
reference formulas (second-order gradients stay exact; torch's own CPU kernel has none).

Served where `serves` says: plain eager mode (dispatch decides), no variant, joint mode only when
torch_fused.plan picks the fused plan and no bias gradient is asked for (dbias needs the pair plan's
statistics), and every stream that holds tokens takes part (an unattended key stream or a query
stream with no key keeps the op path, whose backward gives them zero gradients). Zero-size streams
that require grad are joined to the first query stream by an alias (stream_packing.JoinEmpty), so
their gradients are empty tensors, as through the op.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from ..problem import JOINT, AttentionProblem, problem_builder
from ..stream_packing import JoinEmpty, packed, unpacked, with_empty_outputs
from .torch_backend import PairPlan
from .torch_fused import FUSED, lse_in, QueryStreams
from .torch_fused import plan as fused_plan
from .torch_pair import CPU_BACKWARD, CPU_FORWARD, mark_empty_rows, pair_backward, pair_forward

# one kernel call as a one-stream problem, for the create_graph=True formulas
_call_problem = problem_builder(
    "q", "k", "v", "q_lens", "kv_lens", "attn_mask", "is_causal", "scale", peers=(1,), gate=None,
    bias=None, kv_lengths=None, dropout_seed=None, dropout_p=0.0, normalize=JOINT)


class KernelCall(torch.autograd.Function):
    """out = softmax(scale * q k^T + mask, causal) v through the backend's kernel (torch_pair)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float, can_empty: bool):
        # the CPU kernel straight when it takes the widths as they are (a call of a few tens of
        # microseconds at small shapes: each Python layer counts)
        direct = q.is_cpu and q.shape[-1] == v.shape[-1]
        if direct:
            out, lse = CPU_FORWARD(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        else:
            out, lse = pair_forward(q, k, v, mask, is_causal, scale)
        can_empty = can_empty and mask is not None
        if can_empty:  # rows that see no key: lse -inf (the CPU kernel says 0)
            out, lse = mark_empty_rows(out, lse, mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.is_causal, ctx.scale, ctx.can_empty = mask, is_causal, scale, can_empty
        ctx.direct = direct
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask = ctx.mask
        if torch.is_grad_enabled():  # create_graph=True: gradients with autograd history
            return (*_differentiable_grads(ctx, grad_out, q, k, v, mask), None, None, None, None)
        if ctx.can_empty:
            lse = lse_in(lse, mask)
        if ctx.direct:
            dq, dk, dv = CPU_BACKWARD(grad_out, q, k, v, out, lse, 0.0, ctx.is_causal,
                                      attn_mask=mask, scale=ctx.scale)
        else:
            dq, dk, dv = pair_backward(grad_out, q, k, v, out, lse, mask, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _differentiable_grads(ctx, grad_out, q, k, v, mask):
    from ..double_backward import differentiable_grads  # it imports the backend registry

    batch, heads, q_len = q.shape[:3]
    kv_len = k.shape[2]
    full_mask = None if mask is None else mask.expand(batch, heads, q_len, kv_len)
    problem = _call_problem(q, k, v, (q_len,), (kv_len,), full_mask, ctx.is_causal, ctx.scale)
    needs = ctx.needs_input_grad[:3] + (False,) * 4
    grads = differentiable_grads("torch", problem, grad_out, (q, k, v, None, None, None, None),
                                 needs)
    return grads[:3]


_kernel_call = torch._C._FunctionBase.__dict__["apply"].__get__(None, KernelCall)


def _every_stream_takes_part(p: AttentionProblem) -> bool:
    """Every query stream with tokens attends a key stream with keys, and every key stream with
    keys is attended by such a query stream."""
    n = p.num_streams
    if p.peers == _DENSE.get(n) and 0 not in p.q_lens and 0 not in p.kv_lens:
        return True  # the common call: no loop
    queries, keys = set(), set()
    for s in range(n):
        if p.q_lens[s] == 0:
            continue
        for t in ((s,) if p.diagonal_peers else range(n)):
            if p.kv_lens[t] > 0 and p.attends(s, t):
                queries.add(s)
                keys.add(t)
    return (len(queries) == sum(1 for n in p.q_lens if n > 0)
            and len(keys) == sum(1 for n in p.kv_lens if n > 0))


_DENSE = {n: (1,) * (n * n) for n in range(2, 17)}


def serves(p: AttentionProblem) -> bool:
    """The problem (its q, k, v may be shape placeholders) is computed here exactly."""
    if p.num_streams < 2 or p.has_variants or p.sinks is not None or p.attn_mask is not None \
            or p.dropout_p > 0:
        return False
    if p.normalize == JOINT:
        if fused_plan(p) != FUSED:
            return False
        if p.bias is not None and p.bias.requires_grad and torch.is_grad_enabled():
            return False
    return _every_stream_takes_part(p)


def _joined(queries: Sequence[Tensor], keys, values, first: int):
    """The query streams, with every zero-size tensor that requires grad joined to queries[first]
    by an alias (their gradients: empty tensors, as the op gives)."""
    empties = [t for group in (queries, keys, values) for t in group
               if t.requires_grad and t.numel() == 0]
    if not empties:
        return queries
    queries = list(queries)
    queries[first] = JoinEmpty.apply(queries[first], *empties)
    return queries


def stream_outputs(p: AttentionProblem, queries: Sequence[Tensor], keys: Sequence[Tensor],
                   values: Sequence[Tensor]) -> List[Tensor]:
    """The S outputs (B, Hq, L_s, Ev) of a problem `serves` accepts."""
    plan = PairPlan(p)
    plan.use_key_streams(keys, values)
    streams = QueryStreams(plan, packed=False)
    if p.normalize == JOINT and streams.one_call():
        q = packed(queries, p.q_lens)
        k, v = packed(keys, p.kv_lens), packed(values, p.kv_lens)
        out = _kernel_call(q, k, v, streams.mask(0, streams.nonempty), False, p.scale,
                           streams.rows_can_empty())
        return unpacked(out, p.q_lens)
    has_empty = 0 in p.q_lens or 0 in p.kv_lens
    if has_empty and torch.is_grad_enabled():
        queries = _joined(queries, keys, values, next(s for s, n in enumerate(p.q_lens) if n))
    outs: List = [None] * p.num_streams
    if p.normalize == JOINT:
        can_empty = streams.rows_can_empty()
        for s, q_s in enumerate(queries):
            if p.q_lens[s]:
                attended = streams.attended(s)
                outs[s] = _kernel_call(q_s, streams.keys(attended), streams.values(s, attended),
                                       streams.mask(s, attended), False, p.scale, can_empty)
    else:
        gates = plan.pair_gates()
        for s, q_s in enumerate(queries):
            if p.q_lens[s]:
                outs[s] = _gated_sum(p, plan, gates, s, q_s, keys, values)
    if has_empty:
        empty = (*p.q.shape[:2], 0, p.v.shape[-1])
        outs = [queries[s].new_zeros(empty) if o is None else o for s, o in enumerate(outs)]
        return with_empty_outputs(outs, p.q_lens)
    return outs


def _gated_sum(p: AttentionProblem, plan, gates, s: int, q_s: Tensor, keys, values) -> Tensor:
    """O_s = sum_p g[s,p] * o_sp over the attended key streams (per-peer softmax), accumulated in
    the compute dtype (float32 for 16-bit inputs) and rounded once."""
    acc = None
    for t in plan.peers[s]:
        if p.kv_lens[t] == 0:
            continue
        mask = plan.mask(s, t)
        o = _kernel_call(q_s, keys[t], values[t], mask, plan.causal(s, t), p.scale,
                         mask is not None)
        term = o if gates is None else o * gates[s][t]
        if acc is None:
            acc = term if term.dtype == plan.compute else term.to(plan.compute)
        else:
            acc = acc + term
    return acc if acc.dtype == q_s.dtype else acc.to(q_s.dtype)
