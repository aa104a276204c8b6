"""The public context-parallel calls: validate on every rank, check that ranks agree, dispatch to
ring or Ulysses, and give back this rank's shard of the one-process result."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import api
from ..problem import AttentionProblem
from ..validation import check_kv_lengths
from . import layout as lay
from .comm import gather_signatures, rank_and_world, resolve_group
from .lowlevel import check_merged_statistics, select_backend
from .ring import RingAttention, RingPlan
from .ulysses import check_heads, ulysses_attention

RING, ULYSSES = "ring", "ulysses"
METHODS = (RING, ULYSSES)


def _labels(sdpa: bool):
    if sdpa:
        return lambda role, s: {"queries": "query", "keys": "key", "values": "value"}[role]
    return lambda role, s: f"{role}[{s}]"


def _check_shards(problem: AttentionProblem, layout: str, is_causal: bool, label) -> None:
    if layout == lay.ZIGZAG:
        for role, lens in (("queries", problem.q_lens), ("keys", problem.kv_lens)):
            for s, n in enumerate(lens):
                if n % 2:
                    raise ValueError(
                        f"{label(role, s)}: with layout='zigzag' a shard holds two equal chunks, "
                        f"so its length (dim -2) must be even, got {n}")
    if is_causal:
        for s in range(problem.num_streams):
            if problem.attends(s, s) and problem.q_lens[s] != problem.kv_lens[s]:
                raise ValueError(
                    f"{label('keys', s)}: is_causal with context parallelism needs equal query and "
                    f"key lengths on a self pair, got {problem.q_lens[s]} queries and "
                    f"{problem.kv_lens[s]} keys per shard")


_HEADER = ("number of streams", "batch size", "query heads", "key/value heads", "head dim E",
           "value dim Ev", "method", "layout", "normalize", "is_causal", "gate given",
           "bias given", "kv_lengths given", "peers table", "query requires grad",
           "key/value requires grad", "gate/bias requires grad")


def _check_ranks_agree(problem: AttentionProblem, method: str, layout: str, kv_lengths, group,
                       label) -> None:
    """Shapes and options that must be the same on every rank (else a collective would hang or
    the result be wrong): one all_gather of a few ints, two when the header agrees."""
    table = sum(bit << i for i, bit in enumerate(problem.peers_flat()[:62]))  # fits an int64
    grads = (problem.q.requires_grad, problem.k.requires_grad or problem.v.requires_grad,
             any(t is not None and t.requires_grad for t in (problem.gate, problem.bias)))
    header = [problem.num_streams, problem.q.shape[0], problem.num_q_heads, problem.num_kv_heads,
              problem.head_dim, problem.value_dim, METHODS.index(method), lay.LAYOUTS.index(layout),
              int(problem.normalize == "peer"), int(problem.is_causal),
              int(problem.gate is not None), int(problem.bias is not None),
              int(kv_lengths is not None), table, *map(int, grads)]
    device = problem.q.device
    everyone = gather_signatures(header, group, device)
    for rank, theirs in enumerate(everyone):
        for name, mine_value, their_value in zip(_HEADER, header, theirs):
            if mine_value != their_value:
                raise ValueError(
                    f"{name} differs between ranks: rank {rank} has {their_value}, this rank "
                    f"has {mine_value}; every rank must make the same call on its own shard")
    lengths = list(problem.q_lens) + list(problem.kv_lens)
    everyone = gather_signatures(lengths, group, device)
    num = problem.num_streams
    for rank, theirs in enumerate(everyone):
        for i, (mine_value, their_value) in enumerate(zip(lengths, theirs)):
            if mine_value != their_value:
                role = "queries" if i < num else "keys"
                raise ValueError(
                    f"{label(role, i % num)}: shard lengths (dim -2) differ between ranks: "
                    f"rank {rank} has {their_value}, this rank has {mine_value}")


def _run(problem: AttentionProblem, *, group, method: str, layout: str, kv_lengths,
         backend: Optional[str], check_ranks: bool, label) -> Tensor:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    lay.check_layout(layout)
    group = resolve_group(group)
    rank, world = rank_and_world(group)
    _check_shards(problem, layout, problem.is_causal, label)
    global_kv = [n * world for n in problem.kv_lens]
    if kv_lengths is not None:
        check_kv_lengths(kv_lengths, problem.q.shape[0], global_kv, problem.q)
        kv_lengths = kv_lengths.to(problem.q.device)
    if check_ranks:
        _check_ranks_agree(problem, method, layout, kv_lengths, group, label)
    if method == ULYSSES:
        check_heads(problem.num_q_heads, problem.num_kv_heads, world)
    name = select_backend(problem._replace(kv_lengths=kv_lengths), backend)
    if method == ULYSSES:
        return ulysses_attention(problem, group=group, rank=rank, world=world, layout=layout,
                                 backend=name, kv_lengths=kv_lengths)
    inputs = (problem.q, problem.k, problem.v, problem.gate, problem.bias)
    needs = [t is not None and t.requires_grad for t in inputs]
    if torch.is_grad_enabled() and any(needs):
        check_merged_statistics(name, problem, needs + [False, False])
    plan = RingPlan(group, rank, world, layout, tuple(problem.q_lens), tuple(problem.kv_lens),
                    problem.peers_flat(), problem.is_causal, problem.scale, problem.normalize,
                    kv_lengths, name)
    return RingAttention.apply(*inputs, plan)


def context_parallel_peer_attention(
        queries: Sequence[Tensor], keys: Sequence[Tensor], values: Sequence[Tensor], *,
        group=None, method: str = RING, layout: str = lay.CONTIGUOUS, peers=None,
        gate: Optional[Tensor] = None, bias: Optional[Tensor] = None, normalize: str = "joint",
        is_causal: bool = False, kv_lengths: Optional[Tensor] = None,
        scale: Optional[float] = None, enable_gqa: bool = False,
        backend: Optional[str] = None, check_ranks: bool = True) -> List[Tensor]:
    """peer_attention over sequence shards (SPEC section 10).

    Each rank passes its shard of every stream (dim -2; `layout` "contiguous": positions
    [r*N/W, (r+1)*N/W), "zigzag": chunks r and 2W-1-r of 2W) and gets its shard of the
    one-process outputs; gradients flow to its shards. `gate`, `bias`, `peers`, `kv_lengths` are
    global (the same on every rank, kv_lengths counting global positions); their gradients are
    complete on every rank. `is_causal` is the global top-left mask on the self pairs.
    `method`: "ring" or "ulysses" (heads divisible by the group size). `check_ranks`: compare
    shapes and options between ranks first (one small all_gather and a host sync per call; turn
    it off in a loop whose shapes are known to agree).
    """
    problem = api.peer_problem(queries, keys, values, peers=peers, gate=gate, bias=bias,
                               normalize=normalize, is_causal=is_causal, kv_lengths=None,
                               scale=scale, enable_gqa=enable_gqa)
    out = _run(problem, group=group, method=method, layout=layout, kv_lengths=kv_lengths,
               backend=backend, check_ranks=check_ranks, label=_labels(False))
    if problem.num_streams == 1:
        return [out]
    return list(out.split_with_sizes(problem.q_lens, dim=2))


def context_parallel_sdpa(query: Tensor, key: Tensor, value: Tensor, *, group=None,
                          method: str = RING, layout: str = lay.CONTIGUOUS,
                          is_causal: bool = False, scale: Optional[float] = None,
                          enable_gqa: bool = False, backend: Optional[str] = None,
                          check_ranks: bool = True) -> Tensor:
    """scaled_dot_product_attention over sequence shards (no mask, no dropout): query
    (N, ..., Hq, L/W, E), key (N, ..., H, S/W, E), value (N, ..., H, S/W, Ev) on each rank ->
    this rank's (N, ..., Hq, L/W, Ev) of the one-process result. Options as in
    context_parallel_peer_attention."""
    problem = api.sdpa_problem(query, key, value, None, 0.0, is_causal, scale, enable_gqa)
    out = _run(problem, group=group, method=method, layout=layout, kv_lengths=None,
               backend=backend, check_ranks=check_ranks, label=_labels(True))
    return out.view(*query.shape[:-1], value.shape[-1])
