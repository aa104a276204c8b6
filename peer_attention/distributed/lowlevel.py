"""Low-level forward/backward pairs for frameworks that run their own context parallelism.

Ring attention in other frameworks (diffusers' templated ring attention, torch's context
parallel, ring-flash-attention) needs exactly two things of a kernel: a forward that returns the
output with its log-sum-exp, and a backward that takes (grad_out, out, lse). These functions
give both for SDPA and for peer attention, through the same validation, dispatch and registered
ops (`peer_attention::NAME_fwd` / `NAME_bwd`) as the public API:

    out, lse = sdpa_forward(q, k, v, is_causal=False)                 # lse (N, ..., Hq, L)
    dq, dk, dv = sdpa_backward(grad_out, out, lse, q, k, v)
    outs, lses = peer_forward(queries, keys, values, gate=g, bias=b)  # lses[s] (B, Hq, L_s)
                                                                      # or (B, Hq, S, L_s) "peer"
    dqs, dks, dvs, dgate, dbias = peer_backward(grad_outs, outs, lses, queries, keys, values,
                                                gate=g, bias=b)

The forward runs without autograd (the caller owns the graph); lse is float32 (float64 for
float64 inputs), the natural log of each row's softmax normaliser, -inf for a row with nothing
to attend to.

Merged statistics (the ring-attention contract): `out` and `lse` given to a backward may be the
merged results of a larger attention of which this call's keys are one part; the gradients are
then this part's contributions (sum them over the parts). Each backend declares where it honours
this (`merged_statistics`, backends/base.py): the reference in both modes (in "peer" mode when
each row attends one peer); the torch backend in "joint" mode; the Triton and CUDA kernels in
"joint" mode without gate/bias gradients (they take Delta = <grad_out, out>, and recompute it from
their own keys for those). Elsewhere the result is right only for a call's own statistics, and
`check_merged_statistics` raises NotImplementedError (also for a backend that declares nothing).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import api, entry
from ..entry import ANY, JOINT_WITHOUT_GATE_BIAS_GRADS
from ..problem import PEER, AttentionProblem


def select_backend(problem: AttentionProblem, backend: Optional[str]) -> str:
    return entry.select_backend(problem, backend)


def check_merged_statistics(backend: str, problem: AttentionProblem, needs_grad) -> None:
    """Raise if `backend`'s backward cannot take merged (out, lse) for this problem."""
    served = entry.merged_statistics(backend)
    if served is None:
        raise NotImplementedError(
            f"backend {backend!r} has not declared whether its backward takes merged (out, lse) "
            "(its Backend class's merged_statistics, once tested); "
            "use method='ulysses' or another backend")
    needs_gate = problem.gate is not None and needs_grad[3]
    needs_bias = problem.bias is not None and needs_grad[4]
    if served == ANY:
        return
    if problem.normalize == PEER:
        why = "normalize='peer'"
    elif served == JOINT_WITHOUT_GATE_BIAS_GRADS and (needs_gate or needs_bias):
        why = "gate/bias gradients"
    else:
        return
    raise NotImplementedError(
        f"backend {backend!r}: for {why} its backward recomputes from the call's own keys, so it "
        "cannot take the merged (out, lse) of ring attention; use method='ulysses' or "
        "backend='reference'")


def problem_forward(problem: AttentionProblem, backend: str) -> Tuple[Tensor, Tensor]:
    """(out, lse) of the registered forward op, outside autograd."""
    with torch.no_grad():
        return entry.forward(problem, backend)


def problem_backward(problem: AttentionProblem, backend: str, grad_out: Tensor, out: Tensor,
                     lse: Tensor, needs_grad: Sequence[bool]):
    """The seven gradients (dq, dk, dv, dgate, dbias, dmask, dsinks) of the registered backward
    op; empty tensors where not needed."""
    return entry.backward(problem, backend, grad_out, out, lse, needs_grad)


def sdpa_forward(query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool = False,
                 scale: Optional[float] = None, enable_gqa: bool = False,
                 backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """SDPA's (out (N, ..., Hq, L, Ev), lse (N, ..., Hq, L)); no mask, no dropout."""
    problem = api.sdpa_problem(query, key, value, None, 0.0, is_causal, scale, enable_gqa)
    out, lse = problem_forward(problem, select_backend(problem, backend))
    return out.view(*query.shape[:-1], value.shape[-1]), lse.view(query.shape[:-1])


def sdpa_backward(grad_out: Tensor, out: Tensor, lse: Tensor, query: Tensor, key: Tensor,
                  value: Tensor, *, is_causal: bool = False, scale: Optional[float] = None,
                  enable_gqa: bool = False, backend: Optional[str] = None, merged: bool = True):
    """(dq, dk, dv) of SDPA given (grad_out, out, lse). `merged`: out/lse may be merged over
    more keys than this call's (see the module note); False when they are the call's own."""
    problem = api.sdpa_problem(query, key, value, None, 0.0, is_causal, scale, enable_gqa)
    name = select_backend(problem, backend)
    needs = [True, True, True, False, False, False, False]
    if merged:
        check_merged_statistics(name, problem, needs)
    rows = problem.q.shape[:3]
    dq, dk, dv = problem_backward(
        problem, name, grad_out.reshape(*rows, value.shape[-1]),
        out.reshape(*rows, value.shape[-1]), lse.reshape(rows), needs)[:3]
    return dq.view(query.shape), dk.view(key.shape), dv.view(value.shape)


def peer_forward(queries: Sequence[Tensor], keys: Sequence[Tensor], values: Sequence[Tensor], *,
                 peers=None, gate: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 normalize: str = "joint", is_causal: bool = False,
                 kv_lengths: Optional[Tensor] = None, scale: Optional[float] = None,
                 enable_gqa: bool = False, backend: Optional[str] = None):
    """peer_attention's outputs and, per stream, the lse: (B, Hq, L_s) for "joint",
    (B, Hq, S, L_s) for "peer" (-inf for peers the stream does not attend)."""
    problem = api.peer_problem(queries, keys, values, peers=peers, gate=gate, bias=bias,
                               normalize=normalize, is_causal=is_causal, kv_lengths=kv_lengths,
                               scale=scale, enable_gqa=enable_gqa)
    out, lse = problem_forward(problem, select_backend(problem, backend))
    lens = list(problem.q_lens)
    return list(out.split(lens, dim=2)), list(lse.split(lens, dim=-1))


def peer_backward(grad_outs: Sequence[Tensor], outs: Sequence[Tensor], lses: Sequence[Tensor],
                  queries: Sequence[Tensor], keys: Sequence[Tensor], values: Sequence[Tensor], *,
                  peers=None, gate: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  normalize: str = "joint", is_causal: bool = False,
                  kv_lengths: Optional[Tensor] = None, scale: Optional[float] = None,
                  enable_gqa: bool = False, backend: Optional[str] = None, merged: bool = True):
    """(dqueries, dkeys, dvalues, dgate, dbias) given per-stream (grad_out, out, lse); dgate and
    dbias have the shapes of `gate` and `bias` (None when those are None). `merged` as in
    sdpa_backward."""
    problem = api.peer_problem(queries, keys, values, peers=peers, gate=gate, bias=bias,
                               normalize=normalize, is_causal=is_causal, kv_lengths=kv_lengths,
                               scale=scale, enable_gqa=enable_gqa)
    name = select_backend(problem, backend)
    needs = [True, True, True, gate is not None, bias is not None, False, False]
    if merged:
        check_merged_statistics(name, problem, needs)
    dq, dk, dv, dgate, dbias = problem_backward(
        problem, name, torch.cat(list(grad_outs), dim=2), torch.cat(list(outs), dim=2),
        torch.cat(list(lses), dim=-1), needs)[:5]
    dgate = dgate.sum_to_size(gate.shape).to(gate.dtype) if gate is not None else None
    dbias = dbias.sum_to_size(bias.shape).to(bias.dtype) if bias is not None else None
    return (list(dq.split(list(problem.q_lens), dim=2)),
            list(dk.split(list(problem.kv_lens), dim=2)),
            list(dv.split(list(problem.kv_lens), dim=2)), dgate, dbias)
