"""flash-attn 2's flash_attn_with_kvcache (SPEC section 12): decode over a KV cache.

    from peer_attention import flash_attn_with_kvcache
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                  cache_seqlens=lens, causal=True)

The call is validated (validation_kvcache), q and the new keys are rotated (rotary_cos/sin), the
decode problem is built and a backend chosen (dispatch.select_decode: capabilities and reasons);
only then are k/v written into the caches, so a refused call leaves them untouched. The backend
then attends over the updated cache (decode_problem.DecodeProblem).

Inference only: there is no autograd through the cache; an input that requires grad (with grad
mode on) is a ValueError, never a silently detached result.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .decode_problem import DecodeProblem
from .validation_kvcache import KVCacheArgs, check_kvcache

__all__ = ["flash_attn_with_kvcache"]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                 interleaved: bool) -> Tensor:
    """x (B, L, H, E) with its first rd = 2 * cos.shape[1] dims rotated at positions (B, L):
    pairs (x[2i], x[2i+1]) when interleaved, else the GPT-NeoX halves (x[i], x[i + rd/2]).
    Computed in float32 (float64 for float64) and rounded once to x's dtype, as flash-attn does."""
    half = cos.shape[1]
    rd = 2 * half
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos.to(compute)[positions][:, :, None, :]  # (B, L, 1, rd/2)
    s = sin.to(compute)[positions][:, :, None, :]
    part = x[..., :rd].to(compute)
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = part[..., :half], part[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((rotated.to(x.dtype), x[..., rd:]), -1)


def _append_slots(args: KVCacheArgs, k_cache: Tensor, block_table: Optional[Tensor]):
    """(rows, slots) (B, L_new): where the new keys go, at cache positions cache_seqlens[b] + i."""
    device = k_cache.device
    positions = args.cache_seqlens.long()[:, None] + torch.arange(args.new_len, device=device)
    if args.paged:
        page = k_cache.shape[1]
        return block_table.long().gather(1, positions // page), positions % page
    if args.batch_idx is not None:
        rows = args.batch_idx.long()[:, None]
    else:
        rows = torch.arange(args.batch, device=device)[:, None]
    return rows.expand_as(positions), positions


def append_to_cache(args: KVCacheArgs, k_cache, v_cache, block_table, k: Tensor, v: Tensor):
    """Write k/v (B, L_new, H, .) into the caches in place (validated: every slot is in range)."""
    rows, slots = _append_slots(args, k_cache, block_table)
    k_cache.index_put_((rows, slots), k)
    v_cache.index_put_((rows, slots), v)


def decode_problem(args: KVCacheArgs, q, k_cache, v_cache, block_table, sinks) -> DecodeProblem:
    """The problem the backend sees: key counts after the append, counted from cache_leftpad."""
    seqlens = args.cache_seqlens + args.new_len
    if args.leftpad is not None:
        seqlens = seqlens - args.leftpad
    counts = [n + args.new_len - pad for n, pad in zip(args.seqlens_host, args.leftpad_host)]
    left, right = args.window
    return DecodeProblem(q, k_cache, v_cache, block_table, args.batch_idx, args.leftpad,
                         seqlens, max(counts, default=0), args.scale, left, right, args.softcap,
                         args.alibi_slopes, sinks, args.num_splits, True, min(counts, default=0))


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens=None,
                            cache_batch_idx: Optional[Tensor] = None,
                            cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *,
                            sinks: Optional[Tensor] = None, backend: Optional[str] = None):
    """flash_attn.flash_attn_with_kvcache: q (B, Lq, Hq, E) attends over each sequence's keys in a
    KV cache -> out (B, Lq, Hq, Ev); with return_softmax_lse, (out, lse (B, Hq, Lq) float32).

    Cache: k_cache/v_cache (B_cache, S_max, H, E/Ev), or paged (num_blocks, page_size, H, E/Ev)
    with block_table (B, max_blocks) int32 (any page_size >= 1). cache_seqlens: int or int32 (B,),
    the tokens already in each cache (None: the whole cache). cache_batch_idx (B,) int32: the cache
    row of batch b (contiguous caches). cache_leftpad (B,) int32: sequence b's keys start there.
    k, v (B, L_new, H, E/Ev): written in place at positions cache_seqlens[b] + i, first rotated
    when rotary_cos/rotary_sin (R, rd/2) are given (first rd dims; interleaved pairs, or GPT-NeoX
    halves with rotary_interleaved=False); q is rotated too, at cache_seqlens[b] + i when causal
    or windowed, else at cache_seqlens[b]. Sequence b then attends to its
    n_b = cache_seqlens[b] + L_new - cache_leftpad[b] keys, causal / window_size / ALiBi aligned
    bottom-right (query i sees key j iff i + n_b - Lq - left <= j <= i + n_b - Lq + right).
    softcap, alibi_slopes (Hq,) or (B, Hq) float32, sinks (Hq,) as in flash_attn_func; GQA/MQA
    when Hq is a multiple of H. num_splits: 0 = auto; it changes only speed. Inference only.
    """
    args = check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                         cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                         window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                         return_softmax_lse, sinks)
    with torch.no_grad():
        if rotary_cos is not None:
            start = args.cache_seqlens.long()[:, None]
            k = apply_rotary(k, rotary_cos, rotary_sin,
                             start + torch.arange(args.new_len, device=q.device), rotary_interleaved)
            banded = args.window[0] >= 0 or args.window[1] >= 0
            q_positions = start + torch.arange(q.shape[1], device=q.device) if banded \
                else start.expand(q.shape[0], q.shape[1])
            q = apply_rotary(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
        problem = decode_problem(args, q, k_cache, v_cache, block_table, sinks)
        chosen = dispatch.select_decode(problem, backend)  # refusals raise before any write
        if args.new_len > 0:
            append_to_cache(args, k_cache, v_cache, block_table, k, v)
        out, lse = chosen.decode(problem)
    if return_softmax_lse:
        return out, lse.float()
    return out
