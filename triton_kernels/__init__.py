"""Triton kernels of peer_attention (installed as `peer_attention.triton_kernels`).

Entry points for the "triton" backend, on the normalised problem of `peer_attention.problem`:
    forward(problem) -> (out, lse)
    backward(problem, grad_out, out, lse, needs_grad) -> (dq, dk, dv, dgate, dbias, dmask)
"""
AVAILABLE = False
