"""The caller's streams packed into the problem's tensors, and the output back into streams,
without copies that the composition a user writes does not make (issue 20).

  packed(streams, lens)   the streams concatenated along their tokens (dim 2). When one stream
                          holds every token (Wan's video queries beside empty text and image
                          streams), that stream itself; an empty stream that requires grad is
                          joined to it by an alias whose backward gives it its empty gradient
                          (a cat would copy the filled stream, and its backward too).
  unpacked(out, lens)     the streams' outputs (views of out). When one stream holds every row,
                          its output is `out` itself and the empty ones are empty tensors of the
                          graph: split's backward would concatenate the gradient with zero-size
                          ones, a copy of the whole output.

Under torch.compile, a torch.func transform or torch.jit.trace: the plain cat and split.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor


def _lone(lens: Sequence[int]) -> int:
    """The index of the stream that holds every token, or -1 (several filled, or none)."""
    if len(lens) < 2 or 0 not in lens:
        return -1
    total = sum(lens)
    for i, n in enumerate(lens):
        if n == total:
            return i
    return -1


def _plain_autograd() -> bool:
    # dispatch.transforms_active(), read here directly: this module sits below dispatch
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch._C._is_tracing())


class JoinEmpty(torch.autograd.Function):
    """The filled stream itself (an alias); the empty streams get empty gradients."""

    @staticmethod
    def forward(ctx, filled, *empties):
        ctx.empty_shapes = [e.shape for e in empties]
        return filled.view_as(filled)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[grad.new_zeros(shape) for shape in ctx.empty_shapes])


class LoneOutput(torch.autograd.Function):
    """`out` for the stream that holds every row and empty outputs for the others; the gradient
    of `out` is the lone stream's, as it comes (the empty ones add nothing)."""

    @staticmethod
    def forward(ctx, out, lone: int, num_streams: int):
        ctx.set_materialize_grads(False)  # None for an output that took no part
        ctx.lone = lone
        empty = out.shape[:2] + (0,) + out.shape[3:]
        return tuple(out.view_as(out) if i == lone else out.new_empty(empty)
                     for i in range(num_streams))

    @staticmethod
    def backward(ctx, *grads):
        return grads[ctx.lone], None, None


def packed(streams: Sequence[Tensor], lens: Sequence[int]) -> Tensor:
    lone = _lone(lens)
    if lone < 0:
        return torch.cat(streams, 2)
    filled = streams[lone]
    empties = [t for i, t in enumerate(streams) if i != lone and t.requires_grad]
    if not empties or not torch.is_grad_enabled():
        return filled
    if not _plain_autograd():
        return torch.cat(streams, 2)
    return JoinEmpty.apply(filled, *empties)


def unpacked(out: Tensor, lens: Sequence[int]) -> List[Tensor]:
    if len(lens) == 1:
        return [out]
    lone = _lone(lens)
    if lone < 0 or not (out.requires_grad and _plain_autograd()):
        return list(out.split_with_sizes(lens, 2))
    return list(LoneOutput.apply(out, lone, len(lens)))


def with_empty_outputs(outs: List[Tensor], lens: Sequence[int]) -> List[Tensor]:
    """The outputs of per-stream calls, those of the empty streams (whatever stands there) made
    empty tensors of the graph, on the first filled stream's output (LoneOutput: the gradient of
    that output passes as it comes), as the packed path's outputs are: a gradient may be given
    for every output."""
    if 0 not in lens or not (torch.is_grad_enabled() and _plain_autograd()):
        return outs
    first = next((i for i, n in enumerate(lens) if n > 0), -1)
    if first < 0 or not outs[first].requires_grad:
        return outs
    joined = LoneOutput.apply(outs[first], first, len(lens))
    return [joined[i] if i == first or n == 0 else out
            for i, (n, out) in enumerate(zip(lens, outs))]
