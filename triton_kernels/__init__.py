"""Triton kernels of peer_attention (installed as `peer_attention.triton_kernels`).

Entry points for the "triton" backend, on the normalised problem of `peer_attention.problem`:
    forward(problem) -> (out, lse)
    backward(problem, grad_out, out, lse, needs_grad) -> (dq, dk, dv, dgate, dbias, dmask, dsinks)
    dropout_keep_mask(problem) -> the kernels' dropout keep mask (tests and debugging)

Modules: fwd.py (forward kernel), bwd.py (backward kernels), tiles.py (device helpers shared by
both), configs.py (launch configs / autotuning per architecture), fit.py (what a compiled
config uses and whether it fits a device), dropout.py (the keep mask, for tests),
compile_check.py (the compile check for every architecture, without a GPU),
launch.py (the host side of every launch: flags, bundled arguments), utils.py (host helpers).
"""
from .bwd import backward
from .dropout import dropout_keep_mask
from .fwd import forward
from .utils import INTERPRET

__all__ = ["forward", "backward", "dropout_keep_mask", "INTERPRET"]
