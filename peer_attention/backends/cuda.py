"""The CUDA C++ backend: kernels compiled into `peer_attention._C` (see csrc/).

The extension registers its kernels for the ops `peer_attention::cuda_fwd` / `cuda_bwd`
(`TORCH_LIBRARY_IMPL(peer_attention, CUDA, m)`); their schemas, fake implementations and
autograd are defined in Python (ops.py) like every other backend's.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .base import Backend, Capabilities


def _extension_error() -> Optional[str]:
    if importlib.util.find_spec("peer_attention._C") is None:
        return ("peer_attention._C was not built (this install has no CUDA extension; reinstall "
                "with a CUDA toolkit and PEER_ATTENTION_BUILD_CUDA=1)")
    try:
        from .. import _C  # noqa: F401  (importing registers the kernels)
    except ImportError as exc:
        return (f"peer_attention._C is not built ({exc}); reinstall with a CUDA toolkit and "
                "PEER_ATTENTION_BUILD_CUDA=1")
    return None


class CudaBackend(Backend):
    name = "cuda"
    python_kernels = False
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=256,
    )

    def unavailable_reason(self) -> Optional[str]:
        error = _extension_error()  # dispatch asks once, at import, and caches the answer
        if error:
            return error
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
