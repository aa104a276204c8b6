"""Hugging Face transformers integration: attn_implementation="peer_attention".

    from peer_attention.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="peer_attention")

`register()` adds an attention function named "peer_attention" to transformers'
AttentionInterface, and a mask builder to AttentionMaskInterface (`peer_attention_mask`: "sdpa"'s
boolean masks, True = may attend, which is this package's convention too), so padding and custom
masks reach the kernel. The function is transformers' SDPA path with the call replaced by
peer_attention.scaled_dot_product_attention: GQA runs natively (enable_gqa, no repeated key/value
heads), is_causal is used when there is no mask and more than one query token, and T5's
`position_bias` is merged into a float mask (as transformers' "sdpa" does).

Variants (SPEC section 9) are served natively, without a materialised mask: Gemma 2's logit
`softcap`, gpt-oss's sinks (`s_aux`), sliding windows (`sliding_window`, as the band
(sliding_window - 1, 0) aligned bottom-right) and padding-free packed batches (`cu_seq_lens_q/k`,
`max_length_q/k`) through flash_attn_varlen_func. The mask builder registered for "peer_attention"
(`peer_attention_mask`) returns None whenever the mask would only say "causal" or "causal sliding
window" with the keys ending at the last query (no padding, no custom mask function), so the
kernel applies the band itself; anything else gets transformers' SDPA boolean mask.

Decode steps: with a dynamic cache and no padding there is no mask, and the drop-in sends short
queries over long keys to the split-KV decode kernels; with a static cache or padding the mask
says which cache slots hold keys, and a prefix-shaped mask is served by flash_attn_with_kvcache
over the cache in place (transformers_decode.py).

transformers is an optional dependency: this module imports it only inside functions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..api import scaled_dot_product_attention
from .transformers_decode import cache_decode

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
    if wants_variants_path(query, key, attention_mask, kwargs):
        return variants_forward(module, query, key, value, attention_mask, dropout, scaling,
                                is_causal, **kwargs)
    _refuse([name for name in ("softcap", "s_aux", "cache") if kwargs.get(name) is not None])
    q_length, kv_length = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    position_bias = kwargs.get("position_bias")
    if position_bias is None:  # a decode step over a static cache or padding: the KV-cache API
        out = cache_decode(query, key, value, attention_mask, scaling, bool(is_causal))
        if out is not None:
            return out, None
    # a single query token (decoding) sees every cached key; a mask, when given, already says it all
    is_causal = bool(is_causal) and attention_mask is None and q_length > 1
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


def _refuse(unsupported) -> None:
    """NotImplementedError naming the keyword arguments this function cannot serve."""
    if not unsupported:
        return
    hint = "use 'eager' or 'sdpa' for this model"
    if "cache" in unsupported:  # a paged cache: continuous batching (transformers refuses us there)
        hint = ("for continuous batching load the model with attn_implementation='sdpa' under "
                "peer_attention.patch_torch()")
    raise NotImplementedError(
        f"attn_implementation='peer_attention' does not support {', '.join(unsupported)}; {hint}")


def register(name: str = NAME) -> None:
    """Register `name` ("peer_attention") with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, peer_attention_forward)
    try:  # recent transformers build masks per implementation: without this, no padding mask
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # no per-implementation mask registry to join in this version
        return
    AttentionMaskInterface.register(name, peer_attention_mask)


# ---------------------------------------------------------------------------------------------
# variants: softcap, sinks, sliding windows, packed (varlen) batches, bottom-right causal
# ---------------------------------------------------------------------------------------------

_VARIANT_KWARGS = ("softcap", "s_aux", "sliding_window", "cu_seq_lens_q")


def wants_variants_path(query: Tensor, key: Tensor, attention_mask: Optional[Tensor],
                        kwargs: dict) -> bool:
    """A variant was asked for, or there is no mask and the keys outnumber the queries (a cache:
    without a mask, peer_attention_mask means causal aligned bottom-right)."""
    if any(kwargs.get(name) is not None for name in _VARIANT_KWARGS):
        return True
    # T5's position_bias is served as a float mask by the plain path (it also covers its
    # cross-attention, where the lengths differ)
    return (attention_mask is None and query.shape[2] != key.shape[2]
            and kwargs.get("position_bias") is None)


def _band(is_causal: bool, sliding_window: Optional[int]):
    """transformers' sliding window counts the query itself: (sliding_window - 1) keys back;
    without causality it is symmetric, as in transformers' flash-attention path."""
    if sliding_window is None:
        return (-1, -1)
    reach = int(sliding_window) - 1
    return (reach, 0 if is_causal else reach)


def variants_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Optional[Tensor], dropout: float = 0.0,
                     scaling: Optional[float] = None, is_causal: Optional[bool] = None, *,
                     softcap: Optional[float] = None, s_aux: Optional[Tensor] = None,
                     sliding_window: Optional[int] = None, cu_seq_lens_q: Optional[Tensor] = None,
                     cu_seq_lens_k: Optional[Tensor] = None, max_length_q=None, max_length_k=None,
                     **kwargs) -> Tuple[Tensor, None]:
    """The attention function for calls with variants: ((B, L, Hq, Ev), None)."""
    from ..flash_attn import flash_attn_func, flash_attn_varlen_func

    _refuse([name for name in ("position_bias", "cache") if kwargs.get(name) is not None])
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    softcap = 0.0 if softcap is None else float(softcap)
    options = dict(dropout_p=dropout, softmax_scale=scaling, softcap=softcap, sinks=s_aux)
    batch, num_q_heads, q_length, head_dim = query.shape
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        # padding-free packing: the sequences are concatenated along the length of batch entry 0;
        # the block-diagonal mask transformers may have built says no more than the offsets
        packed = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value)]
        out = flash_attn_varlen_func(
            *packed, _int32(cu_seq_lens_q), _int32(cu_seq_lens_k), _host_int(max_length_q, cu_seq_lens_q),
            _host_int(max_length_k, cu_seq_lens_k), causal=is_causal,
            window_size=_band(is_causal, sliding_window), **options)
        return out.view(batch, q_length, num_q_heads, -1), None
    if attention_mask is None:  # peer_attention_mask found nothing but the causal band
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              causal=is_causal, window_size=_band(is_causal, sliding_window),
                              **options)
        return out, None
    out = cache_decode(query, key, value, attention_mask, scaling, is_causal,
                       _band(is_causal, sliding_window), softcap, s_aux)
    if out is not None:  # a decode step over a static cache or padding: the KV-cache API
        return out, None
    return _masked_forward(query, key, value, attention_mask, dropout, scaling, softcap, s_aux), None


def _int32(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)


def _host_int(max_length, cu_seqlens: Tensor) -> int:
    if max_length is None:
        return int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    return int(max_length)


def _masked_forward(query, key, value, attention_mask, dropout, scaling, softcap, s_aux):
    """An explicit mask (padding, custom patterns) carries causality and the window; the softcap
    and the sinks are still applied by the kernel, on the same normalised problem."""
    from .. import entry
    from ..api import sdpa_problem

    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    problem = sdpa_problem(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                           scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if s_aux is not None and problem.dropout_p > 0:
        raise ValueError("dropout: must be 0 with attention sinks (s_aux)")
    # entry.run checks the variant fields set here (softcap, sinks) as the public API does
    out, _ = entry.run(problem._replace(softcap=softcap, sinks=s_aux))
    return out.transpose(1, 2).contiguous()


def peer_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        mask_function=None, attention_mask: Optional[Tensor] = None,
                        local_size: Optional[int] = None, allow_is_causal_skip: bool = True,
                        **kwargs):
    """transformers' mask builder for "peer_attention": None where the kernel's own band says it
    all (plain causal, or the config's causal sliding window; no padding; the keys end at the
    last query, so bottom-right alignment is exact), else transformers' SDPA boolean mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if allow_is_causal_skip and _band_says_it_all(q_length, kv_length, q_offset, kv_offset,
                                                  attention_mask, local_size, kwargs.get("config")):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                     attention_mask, local_size=local_size, allow_is_causal_skip=False, **kwargs)


def _band_says_it_all(q_length, kv_length, q_offset, kv_offset, attention_mask, local_size,
                      config) -> bool:
    from transformers.masking_utils import prepare_padding_mask

    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return False  # a static cache's tensor offset: reading it would sync or break a graph
    if kv_offset + kv_length != q_offset + q_length:
        return False  # e.g. a static cache's unused slots after the last query
    if local_size is not None:
        # a window the attention function receives as `sliding_window`; a chunked layout is not one
        if local_size != getattr(config, "sliding_window", None) or \
                getattr(config, "attention_chunk_size", None) == local_size:
            return False
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return True
    if torch.compiler.is_compiling():
        return False
    return bool(padding.all())
