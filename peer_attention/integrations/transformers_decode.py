"""Decode steps of transformers' generation over a masked cache, through flash_attn_with_kvcache.

A dynamic cache without padding reaches the attention function with no mask, and the drop-in's
own dispatch sends its short queries to the split-KV decode kernels. A static cache (or padding)
arrives with a boolean mask (B, 1, L, S_max) instead: the keys are the whole preallocated buffer
and only the mask says which slots hold tokens. When that mask is exactly "the keys
[leftpad_b, end_b) of row b, causal (and windowed) aligned bottom-right", the call is a KV-cache
decode: flash_attn_with_kvcache(cache_seqlens=end, cache_leftpad=leftpad) reads only the filled
slots, in place. Anything else (a rolling sliding-window buffer, holes, custom masks, autograd,
compilation) returns None and keeps the masked path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# the split-KV kernels' query rows per sequence (triton_kernels/decode.py MAX_QUERY_ROWS): longer
# queries are prefill chunks, served by the regular kernels with the mask
MAX_DECODE_QUERIES = 16


def _key_range(mask: Tensor, windowed: bool) -> Tuple[Tensor, Tensor]:
    """(leftpad, end) int32 (B,) read off the last query's row (an empty row gives a range that
    the mask check then refuses)."""
    row = mask[:, 0, -1, :]
    length = row.shape[-1]
    end = length - row.flip(-1).int().argmax(-1)
    # a window hides the padding from the last row: then the keys count from 0, and the mask check
    # below refuses the call if padding falls inside the window
    leftpad = torch.zeros_like(end) if windowed else row.int().argmax(-1)
    return leftpad.to(torch.int32), end.to(torch.int32)


def _band_mask(leftpad: Tensor, end: Tensor, q_length: int, key_length: int,
               window: Tuple[int, int]) -> Tensor:
    """The (B, 1, L, S) mask flash_attn_with_kvcache applies: keys [leftpad, end), causal and
    the window aligned bottom-right (query i's diagonal is key end - L + i)."""
    device = end.device
    keys = torch.arange(key_length, device=device)[None, None, :]
    diagonal = (end[:, None] - q_length + torch.arange(q_length, device=device))[:, :, None]
    allowed = (keys >= leftpad[:, None, None]) & (keys < end[:, None, None]) & (keys <= diagonal)
    if window[0] >= 0:
        allowed &= keys >= diagonal - window[0]
    return allowed[:, None]


def cache_decode(query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                 scaling: Optional[float], is_causal: bool, window: Tuple[int, int] = (-1, -1),
                 softcap: float = 0.0, sinks: Optional[Tensor] = None) -> Optional[Tensor]:
    """query (B, Hq, L, E), key/value (B, H, S, E) -> out (B, L, Hq, Ev) through
    flash_attn_with_kvcache, or None when the call is not a decode over a prefix-shaped mask."""
    if attention_mask is None or attention_mask.dtype != torch.bool or not is_causal:
        return None
    batch, _, q_length, _ = query.shape
    key_length = key.shape[2]
    if not 0 < q_length <= MAX_DECODE_QUERIES or key_length < q_length:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or \
            attention_mask.shape[2:] != (q_length, key_length) or \
            attention_mask.shape[0] not in (1, batch):
        return None
    if torch.compiler.is_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None  # the mask check reads the device: no syncs inside graphs
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None  # flash_attn_with_kvcache is inference only
    leftpad, end = _key_range(attention_mask, window[0] >= 0)
    expected = _band_mask(leftpad, end, q_length, key_length, window)
    if not torch.equal(expected.expand(attention_mask.shape[0], -1, -1, -1), attention_mask):
        return None
    if attention_mask.shape[0] != batch:
        leftpad, end = leftpad.expand(batch).contiguous(), end.expand(batch).contiguous()
    from ..kvcache import flash_attn_with_kvcache

    return flash_attn_with_kvcache(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cache_seqlens=end,
        cache_leftpad=leftpad if bool(leftpad.any()) else None, softmax_scale=scaling,
        causal=True, window_size=window, softcap=softcap, sinks=sinks)
