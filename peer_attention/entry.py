"""THE entry point below the public API: serve a normalised problem that an upper layer built.

The public functions (api.py, flash_attn.py) validate their arguments and build an
AttentionProblem (problem.py); the layers above them (integrations/, distributed/) reach the
backends only through the public functions or through this module:

    run(problem, backend=None) -> (out, lse)   the problem's variant fields checked, a backend
                                               chosen (dispatch's rules), its forward with autograd
    check_backend_name(name)                   a `backend=` argument: None (auto) or a name
    select_backend(problem, backend) -> name   the backend that serves `problem`
    forward(problem, name) -> (out, lse)       that backend's forward (autograd included)
    backward(problem, name, grad_out, out, lse, needs_grad)
                                               its backward op: (dq, dk, dv, dgate, dbias, dmask,
                                               dsinks), outside autograd

out is (B, Hq, Tq, Ev) in q's dtype and lse the float32 log-sum-exp (problem.py's note). A problem
changed by an upper layer (`problem._replace(softcap=...)`) goes through `run`, which checks the
variant fields as the public API does: a bad value raises ValueError naming the field instead of
reaching a kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dispatch, ops
from .backends.base import ANY, JOINT_ONLY, JOINT_WITHOUT_GATE_BIAS_GRADS
from .problem import AttentionProblem
from .validation import check_problem_variants

__all__ = ["run", "run_validated", "check_backend_name", "select_backend", "forward", "backward",
           "merged_statistics", "ANY", "JOINT_ONLY", "JOINT_WITHOUT_GATE_BIAS_GRADS"]


def check_backend_name(name: Optional[str]) -> Optional[str]:
    """`name` checked as a `backend=` argument (TypeError / ValueError naming `backend`, as the
    public functions raise them): None for auto (None or "auto"), else a registered backend's
    name. use_backend() blocks and the environment variable are not read here."""
    return None if name is None else dispatch.requested_backend(name)


def select_backend(problem: AttentionProblem, backend: Optional[str] = None) -> str:
    """The name of the backend that serves `problem` (the requested one, which must be able to
    (NotImplementedError with its reasons), else auto's choice)."""
    return dispatch.select(problem, backend).name


def forward(problem: AttentionProblem, name: str) -> Tuple[Tensor, Tensor]:
    """(out, lse) of backend `name`'s forward, with autograd (as the public functions run it)."""
    return dispatch.forward(name, dispatch.BACKENDS[name].prepare(problem))


def backward(problem: AttentionProblem, name: str, grad_out: Tensor, out: Tensor, lse: Tensor,
             needs_grad: Sequence[bool]):
    """The seven gradients (dq, dk, dv, dgate, dbias, dmask, dsinks) of backend `name`'s backward
    op for (grad_out, out, lse), outside autograd; empty tensors where not needed."""
    bwd_op = ops.backend_ops(name)[1]
    with torch.no_grad():
        return bwd_op(grad_out.contiguous(), out.contiguous(), lse.contiguous(), *problem,
                      [bool(n) for n in needs_grad])


def run_validated(problem: AttentionProblem, backend: Optional[str] = None):
    """run() for a problem the public API built and validated itself (no second check)."""
    return forward(problem, select_backend(problem, backend))


def run(problem: AttentionProblem, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(out, lse) of `problem` built or changed by an upper layer: its variant fields validated
    (ValueError / TypeError naming the field), a backend chosen by dispatch's rules (`backend`:
    None/"auto" or a name), its forward run with autograd."""
    return run_validated(check_problem_variants(problem), backend)


def merged_statistics(name: str):
    """Backend `name`'s declared policy for taking merged (out, lse) in its backward (ring
    attention): backends.base.ANY / JOINT_ONLY / JOINT_WITHOUT_GATE_BIAS_GRADS, or None."""
    owner = dispatch.BACKENDS.get(name)
    return None if owner is None else owner.merged_statistics
