"""Route torch.nn.functional.scaled_dot_product_attention to this package.

    peer_attention.patch_torch()            # from now on, until unpatch_torch()
    with peer_attention.patch_torch():      # or only inside the block
        model(x)

While patched, `torch.nn.functional.scaled_dot_product_attention` is a wrapper with torch's
signature. It serves a call with `peer_attention.scaled_dot_product_attention` (the dispatch picks
the backend: auto, `use_backend(...)` or PEER_ATTENTION_BACKEND) and hands it, unchanged, to
torch's own function when it cannot serve it: arguments it does not know, tensor subclasses or
nested tensors, arguments its validation rejects (torch then raises its own error or serves
them), backends that raise NotImplementedError, and calls made while a torch.func transform
(grad, vmap, jacrev, ...) or torch.jit.trace is active. Calls that would kill the process in
torch's kernels (a zero-size head dimension: they divide by it) are never handed over: served
(an empty result, also under a transform) or rejected with this package's ValueError. torch's CausalBias masks
(causal_upper_left / causal_lower_right) are served natively. Errors inside a kernel are not
hidden.

Only the attribute of torch.nn.functional is replaced: code that did
`from torch.nn.functional import scaled_dot_product_attention` before patching keeps torch's
function. Unpatching puts back the exact original object.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import api, dispatch
from .validation import ZeroHeadsError

_ATTRIBUTE = "scaled_dot_product_attention"
_original = None  # torch's function while the patch is installed


def _plain_tensor(t) -> bool:
    return (type(t) is Tensor or type(t) is torch.nn.Parameter) and not t.is_nested


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                 scale=None, enable_gqa=False, **unknown):
    """torch.nn.functional.scaled_dot_product_attention, served by peer_attention when it can."""
    original = _original if _original is not None else getattr(F, _ATTRIBUTE)
    causal_bias = api.is_causal_bias(attn_mask)

    def fall_through():
        if causal_bias and not unknown:
            # torch's CausalBias only recognises torch's own function in its __torch_function__,
            # which is now this wrapper: let it dispatch itself (it calls the patched function
            # with plain arguments), never read its storage as a mask
            return type(attn_mask)._dispatch(query, key, value, attn_mask, dropout_p, is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                        enable_gqa=enable_gqa, **unknown)

    if (unknown or torch.jit.is_scripting()
            or not all(_plain_tensor(t) for t in (query, key, value))
            or (attn_mask is not None and not causal_bias and not _plain_tensor(attn_mask))):
        return fall_through()
    if (not torch.compiler.is_compiling() and api.transforms_active()
            and not dispatch.no_scores(query, key)):
        return fall_through()  # torch.func transforms and tracing: torch's function serves them
    try:
        call = api.prepare_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                enable_gqa)
    except ZeroHeadsError:
        raise  # torch's kernels would divide by the zero heads (SIGFPE): never hand it over
    except (TypeError, ValueError, NotImplementedError):
        return fall_through()
    try:
        return api.run_sdpa(call)
    except NotImplementedError:
        return fall_through()


class TorchPatch:
    """What patch_torch() returns: leaving its `with` block undoes the patch it installed."""

    def __init__(self, installed: bool):
        self.installed = installed  # False when torch was already patched (an outer patch owns it)

    def __enter__(self) -> "TorchPatch":
        return self

    def __exit__(self, *exc_info) -> bool:
        if self.installed:
            unpatch_torch()
            self.installed = False
        return False


def is_patched() -> bool:
    return _original is not None


def patch_torch() -> TorchPatch:
    """Replace torch.nn.functional.scaled_dot_product_attention by this package's (see module doc).

    Takes effect at once; undone by unpatch_torch() or by leaving `with patch_torch():`. Patching
    twice is harmless: only the call that installed the patch undoes it on leaving its block.
    """
    global _original
    if _original is not None:
        return TorchPatch(installed=False)
    _original = getattr(F, _ATTRIBUTE)
    setattr(F, _ATTRIBUTE, _routed_sdpa)
    return TorchPatch(installed=True)


def unpatch_torch() -> bool:
    """Restore torch's original function; returns whether a patch was removed."""
    global _original
    if _original is None:
        return False
    setattr(F, _ATTRIBUTE, _original)
    _original = None
    return True
