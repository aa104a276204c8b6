"""Every backend of the package, in auto's default order of preference (fastest first).

A new backend is its module (a `Backend` subclass, see base.py) plus its place in `_ORDERED`
below; dispatch registers its ops, and its policies (base.py's hooks) travel with it.
"""
from __future__ import annotations

from typing import Tuple

from .base import BACKENDS, Backend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .torch_backend import TorchBackend
from .triton import TritonBackend

# "cuda" after "triton": the CUDA kernels have not yet been run on hardware; they must be validated
# on a GPU (tests/cuda) before auto prefers them. An explicit backend="cuda" still uses them.
# "torch" (torch's own fused kernels, composed) serves the CPU and what our kernels do not.
# "reference" last: it serves every valid problem, so auto never fails where it works.
_ORDERED: Tuple[Backend, ...] = (TritonBackend(), CudaBackend(), TorchBackend(), ReferenceBackend())
BACKENDS.update((backend.name, backend) for backend in _ORDERED)
SPEED_ORDER: Tuple[str, ...] = tuple(backend.name for backend in _ORDERED)
# the backend that serves every valid problem (and the problems without scores: dispatch.no_scores)
ORACLE = ReferenceBackend.name


def names() -> Tuple[str, ...]:
    """Every backend's name, in auto's default order (available on this machine or not: see
    peer_attention.available_backends() for why one cannot run)."""
    return SPEED_ORDER
