"""Problem makers for the Triton backend's tests (tiny shapes: they run under the interpreter)."""
from __future__ import annotations

import torch

from ..backends import cases as backend_cases

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def peer_case(**options):
    """(kernel_fn, reference_fn, inputs, names) for assert_matches_reference on peer_attention
    through the Triton backend (tests/backends/cases.py with this suite's head dims)."""
    return backend_cases.peer_case("triton", **{"head_dim": 20, "value_dim": 12, **options})


def sdpa_case(**options):
    """SDPA through the public drop-in and the Triton backend; `mask` is a float64 tensor (float
    mask, gets a gradient if it requires grad) or a bool tensor."""
    return backend_cases.sdpa_case("triton", **{"head_dim": 20, "value_dim": 12, **options})
