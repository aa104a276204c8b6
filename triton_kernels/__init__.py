"""Triton kernels of peer_attention (installed as `peer_attention.triton_kernels`).

Entry points for the "triton" backend, on the normalised problem of `peer_attention.problem`:
    forward(problem) -> (out, lse)
    backward(problem, grad_out, out, lse, needs_grad) -> (dq, dk, dv, dgate, dbias, dmask)
    dropout_keep_mask(problem) -> the kernels' dropout keep mask (tests and debugging)
"""
from .forward import forward

AVAILABLE = True


def backward(problem, grad_out, out, lse, needs_grad):
    from .backward import backward as _backward

    return _backward(problem, grad_out, out, lse, needs_grad)


__all__ = ["forward", "backward", "AVAILABLE"]
