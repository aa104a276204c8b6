"""Shared test helpers: the accuracy rule of SPEC section 8 and random problem makers."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Sequence
from unittest import mock

import torch
from torch import Tensor

from peer_attention import dispatch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_list(x) -> List[Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def outputs_and_grads(fn: Callable, inputs: Sequence, grad_outputs: Sequence[Tensor] | None):
    """Run fn(*inputs); return (outputs, grads of the floating inputs that require grad)."""
    outs = as_list(fn(*inputs))
    wanted = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if grad_outputs is None or not wanted:
        return [o.detach() for o in outs], []
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outputs) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)]
    return [o.detach() for o in outs], [g.detach() for g in grads]


# PEER_ATTENTION_TEST_DEVICE=cuda (scripts/gpu_check.sh): the inputs of assert_matches_reference
# go to that device, so that suites written with CPU tensors (tests/triton) run on a GPU
TEST_DEVICE = os.environ.get("PEER_ATTENTION_TEST_DEVICE") or None


def _cast(inputs: Sequence, dtype: torch.dtype, requires_grad: Sequence[bool]):
    cast = []
    for t, rg in zip(inputs, requires_grad):
        if isinstance(t, Tensor) and TEST_DEVICE is not None:
            t = t.detach().to(TEST_DEVICE)
        if isinstance(t, Tensor) and t.is_floating_point():
            cast.append(t.detach().to(dtype).requires_grad_(rg))
        else:
            cast.append(t)
    return cast


def max_abs(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(kernel_fn: Callable, reference_fn: Callable, inputs: Sequence,
                             dtype: torch.dtype, *, grad: bool = True, seed: int = 0,
                             names: Sequence[str] | None = None, float32_atol: float = 1e-4):
    """SPEC section 8: outputs and gradients of kernel_fn(*inputs cast to dtype) against
    reference_fn in float64. For float16/bfloat16 the max abs error may be at most twice the error
    of reference_fn run in dtype, plus 1e-5; for float32 at most `float32_atol`.

    `inputs`: float64 tensors (their requires_grad says which gradients are compared) and anything
    else (ints, integer tensors), passed through unchanged.
    """
    requires_grad = [isinstance(t, Tensor) and t.requires_grad for t in inputs]
    exact_outs, exact_grads = outputs_and_grads(reference_fn, _cast(inputs, torch.float64, requires_grad), None)
    grad_outputs = None
    if grad:
        gen = torch.Generator().manual_seed(seed)
        grad_outputs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
                        for o in exact_outs]
        exact_outs, exact_grads = outputs_and_grads(
            reference_fn, _cast(inputs, torch.float64, requires_grad), grad_outputs)
    outs, grads = outputs_and_grads(kernel_fn, _cast(inputs, dtype, requires_grad), grad_outputs)
    if dtype in LOW_PRECISION:
        base_outs, base_grads = outputs_and_grads(reference_fn, _cast(inputs, dtype, requires_grad),
                                                  grad_outputs)
    labels = list(names) if names else [f"input{i}" for i, rg in enumerate(requires_grad) if rg]
    failures = []
    checks = [(f"output{i}", outs[i], exact_outs[i], i) for i in range(len(exact_outs))]
    checks += [(f"grad {labels[i]}", grads[i], exact_grads[i], i) for i in range(len(exact_grads))]
    for label, got, want, i in checks:
        assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert got.dtype == dtype or not got.is_floating_point() or label.startswith("grad"), (
            f"{label}: dtype {got.dtype}, expected {dtype}")
        err = max_abs(got, want)
        if dtype in LOW_PRECISION:
            base = base_outs[i] if label.startswith("output") else base_grads[i]
            bound = 2 * max_abs(base, want) + 1e-5
        else:
            bound = float32_atol
        if not err <= bound:  # also catches NaN
            failures.append(f"{label}: max abs error {err:.3g} > allowed {bound:.3g}")
    assert not failures, "; ".join(failures)


def randn(*shape, dtype=torch.float64, requires_grad=True, device="cpu", gen=None) -> Tensor:
    return torch.randn(*shape, dtype=dtype, device=device, generator=gen).requires_grad_(requires_grad)


@contextlib.contextmanager
def recorded_dispatch(attribute: str = "output_and_backend", record: str = "problem"):
    """Spy on peer_attention.dispatch.<attribute> ("output_and_backend" or "select"): yields the
    list it fills with each call's problem (record="problem") or, for "output_and_backend", the
    name of the backend that served it (record="backend")."""
    seen = []
    original = getattr(dispatch, attribute)

    def spy(problem, explicit=None):
        if record == "problem":
            seen.append(problem)
            return original(problem, explicit)
        out, name = original(problem, explicit)
        seen.append(name)
        return out, name

    with mock.patch.object(dispatch, attribute, spy):
        yield seen
