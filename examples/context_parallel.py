"""Context parallelism: three streams of one long sequence split over the ranks of a group.

    torchrun --nproc-per-node 2 examples/context_parallel.py                  # gloo on the CPU
    torchrun --nproc-per-node 4 examples/context_parallel.py --layout zigzag --method ulysses
    torchrun --nproc-per-node 8 examples/context_parallel.py --tokens 65536   # NCCL on 8 GPUs

Every rank builds the same full tensors (same seed), keeps its shard of every stream, runs
causal joint peer attention with a gate and a bias over the group, and backpropagates. With
--check (the default on the CPU) rank 0 also runs the one-process call and prints the largest
difference of the outputs and of the gradients, gathered from all ranks.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import peer_attention as pa
from peer_attention import distributed as cp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=cp.METHODS, default="ring")
    parser.add_argument("--layout", choices=cp.LAYOUTS, default="contiguous")
    parser.add_argument("--tokens", type=int, default=256, help="per stream")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--backend", default=None, help="local kernel (default: auto)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    check = (not use_cuda) if args.check is None else args.check

    torch.manual_seed(0)  # the same full tensors on every rank
    batch, streams, dim = 1, 3, 64
    full = [[torch.randn(batch, args.heads, args.tokens, dim, device=device, dtype=dtype)
             for _ in range(streams)] for _ in range(3)]
    gate = torch.rand(streams, streams, 1, dim, device=device, requires_grad=True)
    bias = torch.randn(batch, streams, streams, args.heads, device=device, requires_grad=True)
    options = dict(gate=gate, bias=bias, is_causal=True, backend=args.backend)

    shards = [[cp.shard(t, rank, world, args.layout).requires_grad_() for t in role]
              for role in full]
    start = time.perf_counter()
    outs = cp.context_parallel_peer_attention(*shards, method=args.method, layout=args.layout,
                                              **options)
    sum(o.float().square().sum() for o in outs).backward()
    if use_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if rank == 0:
        print(f"{world} ranks, {args.method}/{args.layout}: {streams} streams x {args.tokens} "
              f"tokens, forward + backward {seconds * 1e3:.1f} ms on rank 0")
    if not check:
        dist.destroy_process_group()
        return

    # the one-process call on the full tensors, and everyone's shards gathered
    leaves = [[t.clone().requires_grad_() for t in role] for role in full]
    gate_ref = gate.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    want = pa.peer_attention(*leaves, **{**options, "gate": gate_ref, "bias": bias_ref})
    sum(o.float().square().sum() for o in want).backward()

    def gathered(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return cp.unshard(parts, args.layout)

    errors = {
        "outputs": max((gathered(o.detach()) - w.detach()).abs().max().item()
                       for o, w in zip(outs, want)),
        "input grads": max((gathered(s.grad) - w.grad).abs().max().item()
                           for role, ref in zip(shards, leaves) for s, w in zip(role, ref)),
        "gate/bias grads": max((gate.grad - gate_ref.grad).abs().max().item(),
                               (bias.grad - bias_ref.grad).abs().max().item()),
    }
    if rank == 0:
        print("max |context parallel - one process|: "
              + ", ".join(f"{name} {value:.2e}" for name, value in errors.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
