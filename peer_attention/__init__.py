"""peer_attention: fused multi-stream peer attention and a drop-in scaled_dot_product_attention.

    import peer_attention as pa
    out = pa.scaled_dot_product_attention(q, k, v, is_causal=True)
    outs = pa.peer_attention([q_rgb, q_flow], [k_rgb, k_flow], [v_rgb, v_flow], gate=g, bias=b)

See README.md for the formulas, backends and build notes. `peer_attention.distributed` (context
parallelism) is imported on first use, so `import peer_attention` stays as cheap as without it.
"""
import importlib

from .api import peer_attention, scaled_dot_product_attention
from .flash_attn import flash_attn_func, flash_attn_varlen_func
from .kvcache import flash_attn_with_kvcache
from .dispatch import available_backends, use_backend
from .patching import patch_torch, unpatch_torch
from . import nn  # peer_attention.nn.PeerAttention, peer_attention.nn.MultiheadAttention

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("distributed",)  # imported on first attribute access (PEP 562)

__all__ = [
    "scaled_dot_product_attention",
    "peer_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "available_backends",
    "use_backend",
    "patch_torch",
    "unpatch_torch",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it as an attribute here
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
