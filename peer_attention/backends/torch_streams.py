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
calls (cat, the gate's product, the sums: C++ nodes, no Python in the backward); the kernel calls
of one call are one autograd node (KernelCalls), whose backward is the kernels' backward and,
under create_graph=True, the reference formulas (second-order gradients stay exact; torch's own
CPU kernel has none).

Served where `serves` says: plain eager mode (dispatch decides), no variant, joint mode only when
torch_fused.plan picks the fused plan and no bias gradient is asked for (dbias needs the pair plan's
statistics), and every stream that holds tokens takes part (an unattended key stream or a query
stream with no key keeps the op path, whose backward gives them zero gradients). Zero-size streams
that require grad are joined to the first query stream by an alias (stream_packing.JoinEmpty), so
their gradients are empty tensors, as through the op.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..problem import JOINT, AttentionProblem, problem_builder
from ..stream_packing import JoinEmpty, packed, unpacked, with_empty_outputs
from .torch_backend import DENSE_TABLES, PairPlan, is_one_call
from .torch_fused import FUSED, lse_in, QueryStreams
from .torch_fused import plan as fused_plan
from .torch_pair import mark_empty_rows, pair_backward, pair_forward

# one kernel call as a one-stream problem, for the create_graph=True formulas
_call_problem = problem_builder(
    "q", "k", "v", "q_lens", "kv_lens", "attn_mask", "is_causal", "scale", peers=(1,), gate=None,
    bias=None, kv_lengths=None, dropout_seed=None, dropout_p=0.0, normalize=JOINT)


class Call(NamedTuple):
    """One kernel call: out = softmax(scale * q k^T + mask, causal) v (torch_pair's kernels)."""
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Optional[Tensor]
    is_causal: bool
    can_empty: bool  # the mask may hide every key of a row


def _forward(q, k, v, mask, is_causal: bool, scale: float, can_empty: bool):
    out, lse = pair_forward(q, k, v, mask, is_causal, scale)
    if can_empty:  # rows that see no key: lse -inf (the CPU kernel says 0)
        out, lse = mark_empty_rows(out, lse, mask)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, mask, is_causal: bool, scale: float, can_empty: bool):
    if can_empty:
        lse = lse_in(lse, mask)
    return pair_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale)


class KernelCalls(torch.autograd.Function):
    """The kernel calls of one peer_attention call, as one autograd node: their outputs, in
    order. One Python node for all of them (not one per call): a Python node costs ~7 us forward
    and ~15-30 us backward, as much as a small kernel call."""

    @staticmethod
    def forward(ctx, options, scale: float, *tensors):
        # options: (mask, is_causal, can_empty) per call; tensors: q, k, v of each call in turn
        outs, stats = [], []
        for i, (mask, is_causal, can_empty) in enumerate(options):
            out, lse = _forward(*tensors[3 * i:3 * i + 3], mask, is_causal, scale, can_empty)
            outs.append(out)
            stats += (out, lse)
        ctx.save_for_backward(*tensors, *stats)
        ctx.options, ctx.scale = options, scale
        ctx.set_materialize_grads(False)  # None for an output that took no part
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        saved = ctx.saved_tensors
        options, scale = ctx.options, ctx.scale
        tensors, stats = saved[:3 * len(options)], saved[3 * len(options):]
        create_graph = torch.is_grad_enabled()
        grads = [None] * len(tensors)
        for i, ((mask, is_causal, can_empty), grad_out) in enumerate(zip(options, grad_outs)):
            if grad_out is None:
                continue
            q, k, v = tensors[3 * i:3 * i + 3]
            if create_graph:  # create_graph=True: gradients with autograd history
                needs = ctx.needs_input_grad[2 + 3 * i:5 + 3 * i]
                grads[3 * i:3 * i + 3] = _differentiable_grads(grad_out, q, k, v, mask, is_causal,
                                                               scale, needs)
            else:
                grads[3 * i:3 * i + 3] = _backward(grad_out, q, k, v, stats[2 * i],
                                                   stats[2 * i + 1], mask, is_causal, scale,
                                                   can_empty)
        return (None, None, *grads)


def _differentiable_grads(grad_out, q, k, v, mask, is_causal: bool, scale: float, needs):
    from ..double_backward import differentiable_grads  # it imports the backend registry

    batch, heads, q_len = q.shape[:3]
    kv_len = k.shape[2]
    full_mask = None if mask is None else mask.expand(batch, heads, q_len, kv_len)
    problem = _call_problem(q, k, v, (q_len,), (kv_len,), full_mask, is_causal, scale)
    grads = differentiable_grads("torch", problem, grad_out, (q, k, v, None, None, None, None),
                                 tuple(needs) + (False,) * 4)
    return grads[:3]


_apply_calls = torch._C._FunctionBase.__dict__["apply"].__get__(None, KernelCalls)


def kernel_calls(calls: Sequence[Call], scale: float) -> Tuple[Tensor, ...]:
    """The outputs of `calls`, differentiable (KernelCalls)."""
    options = tuple((c.mask, c.is_causal, c.can_empty and c.mask is not None) for c in calls)
    return _apply_calls(options, scale, *[t for c in calls for t in (c.q, c.k, c.v)])


def _every_stream_takes_part(p: AttentionProblem) -> bool:
    """Every query stream with tokens attends a key stream with keys, and every key stream with
    keys is attended by such a query stream."""
    n = p.num_streams
    if p.peers == DENSE_TABLES.get(n) and 0 not in p.q_lens and 0 not in p.kv_lens:
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
    if is_one_call(p):  # nothing per pair, no mask: torch.cat + one call + split, no plan
        return _packed_call(p, queries, keys, values, None, False)
    plan = PairPlan(p)
    plan.use_key_streams(keys, values)
    streams = QueryStreams(plan, packed=False)
    if p.normalize == JOINT and streams.one_call():  # the same with kv_lengths key rows
        return _packed_call(p, queries, keys, values, streams.mask(0, streams.nonempty),
                            streams.rows_can_empty())
    has_empty = 0 in p.q_lens or 0 in p.kv_lens
    if has_empty and torch.is_grad_enabled():
        queries = _joined(queries, keys, values, next(s for s, n in enumerate(p.q_lens) if n))
    filled = [s for s in range(p.num_streams) if p.q_lens[s]]
    outs: List = [None] * p.num_streams
    if p.normalize == JOINT:
        can_empty = streams.rows_can_empty()
        calls = []
        for s in filled:
            attended = streams.attended(s)
            calls.append(Call(queries[s], streams.keys(attended), streams.values(s, attended),
                              streams.mask(s, attended), False, can_empty))
        for s, out in zip(filled, kernel_calls(calls, p.scale)):
            outs[s] = out
    else:
        _gated_sums(p, plan, queries, keys, values, filled, outs)
    if has_empty:
        empty = (*p.q.shape[:2], 0, p.v.shape[-1])
        outs = [queries[s].new_zeros(empty) if o is None else o for s, o in enumerate(outs)]
        return with_empty_outputs(outs, p.q_lens)
    return outs


def _packed_call(p: AttentionProblem, queries, keys, values, mask, can_empty: bool):
    """One kernel call on the packed streams (torch.cat of each role), its output split."""
    q = packed(queries, p.q_lens)
    k, v = packed(keys, p.kv_lens), packed(values, p.kv_lens)
    out, = kernel_calls([Call(q, k, v, mask, False, can_empty)], p.scale)
    return unpacked(out, p.q_lens)


def _gated_sums(p: AttentionProblem, plan, queries, keys, values, filled, outs) -> None:
    """outs[s] = sum_p g[s,p] * o_sp over the attended key streams (per-peer softmax), accumulated
    in the compute dtype (float32 for 16-bit inputs) and rounded once."""
    pairs, calls = [], []
    for s in filled:
        for t in plan.peers[s]:
            if p.kv_lens[t]:
                mask = plan.mask(s, t)
                pairs.append((s, t))
                calls.append(Call(queries[s], keys[t], values[t], mask, plan.causal(s, t),
                                  mask is not None))
    gates = plan.pair_gates()
    acc = {}
    for (s, t), o in zip(pairs, kernel_calls(calls, p.scale)):
        term = o if gates is None else o * gates[s][t]
        if s not in acc:
            acc[s] = term if term.dtype == plan.compute else term.to(plan.compute)
        else:
            acc[s] = acc[s] + term
    for s, total in acc.items():
        outs[s] = total if total.dtype == queries[s].dtype else total.to(queries[s].dtype)
