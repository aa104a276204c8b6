"""Hugging Face transformers integration: attn_implementation="peer_attention".

    from peer_attention.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="peer_attention")

`register()` adds an attention function named "peer_attention" to transformers'
AttentionInterface, and the same mask builder as "sdpa" (boolean masks, True = may attend, which
is this package's convention too) to AttentionMaskInterface, so padding and causal masks reach
the kernel. The function is transformers' SDPA path with the call replaced by
peer_attention.scaled_dot_product_attention: GQA runs natively (enable_gqa, no repeated key/value
heads), is_causal is used when there is no mask and more than one query token, and T5's
`position_bias` is merged into a float mask (as transformers' "sdpa" does).

transformers is an optional dependency: this module imports it only inside register().
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..api import scaled_dot_product_attention

NAME = "peer_attention"


def _position_bias_mask(position_bias: Tensor, attention_mask: Optional[Tensor],
                        is_causal: bool) -> Tensor:
    """T5's position_bias (B or 1, H, L, S) merged with the mask into one float mask, as
    transformers' "sdpa" does: masked positions get the dtype's minimum (not -inf), so a fully
    masked row is uniform there too."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return position_bias + attention_mask
    allowed = attention_mask
    if allowed is None and is_causal:
        q_length, kv_length = position_bias.shape[-2:]
        rows = torch.arange(q_length, device=position_bias.device)
        cols = torch.arange(kv_length, device=position_bias.device)
        allowed = rows[:, None] >= cols[None, :]
    if allowed is None:
        return position_bias
    return torch.where(allowed, position_bias, torch.finfo(position_bias.dtype).min)


def peer_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Optional[Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                           **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, L, E), key/value (B, H, S, E)
    -> ((B, L, Hq, Ev), None)."""
    unsupported = [name for name in ("softcap", "s_aux", "cache")
                   if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(
            f"attn_implementation='peer_attention' does not support {', '.join(unsupported)}; "
            "use 'eager' or 'sdpa' for this model")
    q_length, kv_length = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # a single query token (decoding) sees every cached key; a mask, when given, already says it all
    is_causal = bool(is_causal) and attention_mask is None and q_length > 1
    position_bias = kwargs.get("position_bias")
    if is_causal and kv_length > q_length:
        # top-left causal alignment: keys past the last query position are masked anyway
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:  # T5's relative position bias: an additive float mask
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal)
        is_causal = False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register `name` ("peer_attention") with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, peer_attention_forward)
    try:  # recent transformers build masks per implementation: without this, no padding mask
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # no per-implementation mask registry to join in this version
        return
    AttentionMaskInterface.register(name, sdpa_mask)
