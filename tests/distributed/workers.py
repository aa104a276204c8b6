"""What each spawned rank runs: every case against the one-process call, errors written to a file.

One process group per world size runs all the cases (starting processes that import torch costs
seconds each). A case that raises on a rank is recorded as its message; a gloo timeout turns a
hang into such a message instead of a stuck test run.
"""
from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cases import CASES, ERROR_CASES, build_inputs

BACKEND = "reference"  # for the bad calls, which fail before any kernel runs


def _max_error(got, want) -> float:
    return float((got.detach().double() - want.detach()).abs().max()) if want.numel() else 0.0


def _one_process(case, tensors, options, backend):
    import peer_attention as pa

    leaves = [t.clone().requires_grad_() for t in tensors] if case["kind"] == "sdpa" else \
        [[t.clone().requires_grad_() for t in group] for group in tensors]
    extras = {k: (v.clone().requires_grad_() if k in ("gate", "bias") else v)
              for k, v in options.items()}
    if case["kind"] == "sdpa":
        outs = [pa.scaled_dot_product_attention(*leaves, backend=backend, **extras)]
        inputs = list(leaves)
    else:
        outs = pa.peer_attention(*leaves, backend=backend, **extras)
        inputs = [t for group in leaves for t in group]
    globals_ = [extras[k] for k in ("gate", "bias") if k in extras]
    return outs, inputs, globals_


def run_case(case, rank: int, world: int, seed: int, backend: str,
             dtype: torch.dtype = torch.float64) -> float:
    """Largest error of this rank's outputs and gradients against the one-process call of the
    reference in float64 (the context-parallel call runs `backend` in `dtype`)."""
    from peer_attention import distributed as cp

    tensors, options = build_inputs(case, world, seed)
    outs, inputs, globals_ = _one_process(case, tensors, options, "reference")
    gen = torch.Generator().manual_seed(seed + 1)
    grad_outs = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    want_grads = torch.autograd.grad(outs, inputs + globals_, grad_outs)

    layout, method = case["layout"], case["method"]

    def cut(t):
        return cp.shard(t.detach().to(dtype), rank, world, layout).requires_grad_()

    shards = [cut(t) for t in inputs]
    extras = {k: (v.to(dtype).requires_grad_() if k in ("gate", "bias") else v)
              for k, v in options.items()}
    mine_globals = [extras[k] for k in ("gate", "bias") if k in extras]
    if case["kind"] == "sdpa":
        got = [cp.context_parallel_sdpa(*shards, method=method, layout=layout, backend=backend,
                                        **extras)]
    else:
        num = len(tensors[0])
        got = cp.context_parallel_peer_attention(
            shards[:num], shards[num:2 * num], shards[2 * num:], method=method, layout=layout,
            backend=backend, **extras)
    got_grads = torch.autograd.grad(
        got, shards + mine_globals, [cp.shard(g.to(dtype), rank, world, layout) for g in grad_outs])
    errors = [_max_error(o, cp.shard(w.detach(), rank, world, layout)) for o, w in zip(got, outs)]
    for index, (g, w) in enumerate(zip(got_grads, want_grads)):
        # shards get this rank's part of the gradient, gate and bias the whole of it
        expected = cp.shard(w, rank, world, layout) if index < len(shards) else w
        errors.append(_max_error(g, expected))
    return max(errors)


def run_subgroup_case(rank: int, world: int) -> float:
    """Two halves of the world, each a group of its own running its own call: `group=` and the
    mapping of group ranks to global ranks."""
    from peer_attention import distributed as cp

    half = world // 2
    groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
    group, group_rank = groups[rank // half], rank % half
    case = dict(kind="sdpa", method="ring", layout="zigzag", is_causal=True)
    (q, k, v), _ = build_inputs(case, half, seed=77 + rank // half)  # each half its own data
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, is_causal=True)
    grad_out = torch.ones_like(want)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    shards = [cp.shard(t, group_rank, half, "zigzag").requires_grad_() for t in (q, k, v)]
    got = cp.context_parallel_sdpa(*shards, group=group, layout="zigzag", is_causal=True,
                                   backend="reference")
    got_grads = torch.autograd.grad(got, shards, cp.shard(grad_out, group_rank, half, "zigzag"))
    errors = [_max_error(got, cp.shard(want, group_rank, half, "zigzag"))]
    errors += [_max_error(g, cp.shard(w, group_rank, half, "zigzag"))
               for g, w in zip(got_grads, want_grads)]
    return max(errors)


def run_error_case(name: str, rank: int, world: int):
    """Bad calls: return the message of the error raised (None if none was)."""
    from peer_attention import distributed as cp

    def q(heads=2 * world, length=4):
        return torch.randn(1, heads, length, 4, dtype=torch.float64)

    try:
        if name == "uneven_shards":  # rank 0's key shard is longer than the others'
            k = q(length=6 if rank == 0 else 4)
            cp.context_parallel_sdpa(q(), k, k, backend=BACKEND)
        elif name == "ulysses_heads":
            t = q(heads=world + 1)
            cp.context_parallel_sdpa(t, t, t, method="ulysses", backend=BACKEND)
        elif name == "zigzag_odd":
            t = q(length=3)
            cp.context_parallel_sdpa(t, t, t, layout="zigzag", backend=BACKEND)
        elif name == "causal_lengths":
            cp.context_parallel_sdpa(q(), q(length=8), q(length=8), is_causal=True,
                                     backend=BACKEND)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def worker(rank: int, world: int, store_path: str, out_dir: str, names, backend: str,
           dtype_name: str = "float64", error_cases=ERROR_CASES):
    torch.set_num_threads(1)  # W processes share a few cores: more threads only contend
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for index, name in enumerate(names):
            try:
                results[name] = run_case(CASES[name], rank, world, 1000 + index, backend,
                                         getattr(torch, dtype_name))
            except Exception:  # recorded per case: the test of that case fails with it
                results[name] = traceback.format_exc(limit=6)
        for name in error_cases:
            results["error:" + name] = run_error_case(name, rank, world)
        if world == 4 and error_cases:
            try:
                results["subgroups"] = run_subgroup_case(rank, world)
            except Exception:
                results["subgroups"] = traceback.format_exc(limit=6)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
