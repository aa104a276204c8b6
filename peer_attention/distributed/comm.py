"""The collectives context parallelism needs, on any torch.distributed backend (NCCL, gloo).

Ring: every rank sends to rank+1 and receives from rank-1 with one batch_isend_irecv, started
before the step's compute and waited for after it. Ulysses: all_to_all_single, which is its own
adjoint (so the backward of an all-to-all is the same all-to-all). Gradients of global tensors
(gate, bias) are summed over the group.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_group(group):
    """The process group to use (None = the world), or a clear error when there is none."""
    if not dist.is_available():
        raise RuntimeError("group: torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(
            "group: the default process group is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
    group = dist.group.WORLD if group is None else group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got "
                        f"{type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return group


def rank_and_world(group):
    return dist.get_rank(group), dist.get_world_size(group)


class RingExchange:
    """Send tensors to the next rank and receive the previous rank's in flight."""

    def __init__(self, tensors: Sequence[Tensor], group):
        rank, world = rank_and_world(group)
        # contiguous buffers, kept alive until the transfers are waited for
        self.sent = [t.contiguous() for t in tensors]
        self.received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        send_to = dist.get_global_rank(group, (rank + 1) % world)
        recv_from = dist.get_global_rank(group, (rank - 1) % world)
        ops = []
        for out, into in zip(self.sent, self.received):
            ops.append(dist.P2POp(dist.isend, out, send_to, group))
            ops.append(dist.P2POp(dist.irecv, into, recv_from, group))
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> List[Tensor]:
        for request in self.requests:
            request.wait()
        return self.received


def all_to_all(x: Tensor, group) -> Tensor:
    """x (W, ...) with x[j] meant for rank j -> y (W, ...) with y[j] from rank j."""
    x = x.contiguous()
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x, group=group)
    return y


class AllToAll(torch.autograd.Function):
    """all_to_all with its adjoint (itself) as the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group):
        ctx.group = group
        return all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.group), None


class SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group, so that a global input
    used by every rank for its own part ends with its complete gradient on every rank."""

    @staticmethod
    def forward(ctx, x: Tensor, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(t: Optional[Tensor], group) -> Optional[Tensor]:
    if t is None or t.numel() == 0:
        return t
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


def gather_signatures(signature: Sequence[int], group, device) -> List[List[int]]:
    """Every rank's list of ints (all of the same length), for checking that ranks agree."""
    _, world = rank_and_world(group)
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor(list(signature), dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return [t.tolist() for t in everyone]
