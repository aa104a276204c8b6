"""Argument checks of flash_attn_with_kvcache (SPEC sections 4 and 12), done before anything runs.

Every message names the argument. Nothing here writes a cache: a refused call leaves the caches
as they were. The integer arguments whose values decide where the call reads and writes
(cache_seqlens, cache_leftpad, cache_batch_idx, block_table) are range-checked on the host: one
device sync for the per-sequence vectors, and with a block table one more for its used entries.
"""
from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .validation import (dims_text, shape_text, check_alibi_slopes, check_bool, check_float_dtype,
                         check_int, check_same, check_scale, check_sinks, check_softcap,
                         check_tensor, check_window)


class KVCacheArgs(NamedTuple):
    """A validated call: the tensors as given, the per-sequence integers on the device as int32
    (B,) and their host copies, and the options in canonical form."""
    batch: int
    new_len: int                    # L_new: rows of k/v appended (0 without k/v)
    paged: bool
    cache_seqlens: Tensor           # (B,) int32 on q's device: tokens in each cache before the append
    seqlens_host: List[int]
    leftpad: Optional[Tensor]       # (B,) int32 or None
    leftpad_host: List[int]         # zeros without leftpad
    batch_idx: Optional[Tensor]     # (B,) int32 or None
    scale: float
    window: tuple                   # (left, right), causal folded in (right = 0)
    softcap: float
    alibi_slopes: Optional[Tensor]  # (B, Hq) view or None
    num_splits: int


def _int_vector(name: str, t, batch: int, ref: Tensor) -> Tensor:
    check_tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name}: expected shape (B,) = ({batch},), got {shape_text(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as q), got {t.device}")
    return t


def _check_grad_free(tensors) -> None:
    """Inference only: flash-attn's function records no graph; a silently detached output would
    be a wrong (zero) gradient, so an input that asks for one is refused."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors:
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(
                f"{name}: requires grad, but flash_attn_with_kvcache is inference only (no "
                "autograd); call it under torch.no_grad() / torch.inference_mode() or pass "
                "detached tensors (flash_attn_func and the SDPA drop-in are differentiable)")


def _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, k, head_dim: int) -> int:
    """Returns the rotary dim rd (0 without rotary)."""
    check_bool("rotary_interleaved", rotary_interleaved)
    if rotary_cos is None and rotary_sin is None:
        return 0
    if rotary_cos is None or rotary_sin is None:
        missing = "rotary_sin" if rotary_sin is None else "rotary_cos"
        raise ValueError(f"{missing}: rotary_cos and rotary_sin must be given together")
    if k is None:
        raise ValueError("rotary_cos: rotary embedding is applied to the appended k and to q; "
                         "pass k and v with it (as flash-attn requires)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        check_tensor(name, t)
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected 2 dims (R, rotary_dim / 2), got {shape_text(t)}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (as q), got {t.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"rotary_sin: expected shape {shape_text(rotary_cos)} as rotary_cos, got "
                         f"{shape_text(rotary_sin)}")
    rotary_dim = 2 * rotary_cos.shape[1]
    if rotary_dim == 0 or rotary_dim > head_dim:
        raise ValueError(f"rotary_cos: expected rotary_dim / 2 in [1, E / 2] = [1, {head_dim // 2}]"
                         f" (rotary_dim <= head dim E={head_dim}), got {shape_text(rotary_cos)}")
    return rotary_dim


def _check_caches(q, k_cache, v_cache, block_table, batch: int):
    """Shapes of the caches (contiguous or paged) against q; returns (capacity per sequence,
    paged)."""
    check_tensor("k_cache", k_cache)
    check_tensor("v_cache", v_cache)
    check_same("k_cache", k_cache, "q", q)
    check_same("v_cache", v_cache, "q", q)
    layout = "(num_blocks, page_size, H, E)" if block_table is not None else "(B_cache, S_max, H, E)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims {layout}, got {shape_text(t)}")
    head_dim, num_q_heads = q.shape[3], q.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head dim E={head_dim} as q, got {shape_text(k_cache)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache: expected {dims_text(tuple(k_cache.shape[:3]) + ('Ev',))} as "
                         f"k_cache, got {shape_text(v_cache)}")
    if v_cache.shape[3] == 0:
        raise ValueError(f"v_cache: expected value dim Ev >= 1, got {shape_text(v_cache)}")
    num_kv_heads = k_cache.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"k_cache: the query heads Hq={num_q_heads} must be a multiple of the "
                         f"cache's key/value heads H={num_kv_heads} (q {shape_text(q)}, k_cache "
                         f"{shape_text(k_cache)})")
    if block_table is None:
        return k_cache.shape[1], False
    check_tensor("block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table: expected dtype torch.int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape (B, max_blocks) with B={batch}, got "
                         f"{shape_text(block_table)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table: expected device {q.device} (as q), got {block_table.device}")
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache: expected page_size >= 1, got {shape_text(k_cache)}")
    return block_table.shape[1] * k_cache.shape[1], True


def _check_new(k, v, q, k_cache, v_cache, batch: int) -> int:
    """k, v (B, L_new, H, E / Ev); returns L_new (0 without them)."""
    if k is None and v is None:
        return 0
    if k is None or v is None:
        raise ValueError(f"{'k' if k is None else 'v'}: k and v must be given together")
    check_tensor("k", k)
    check_tensor("v", v)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    heads = k_cache.shape[2]
    for name, t, dim in (("k", k, k_cache.shape[3]), ("v", v, v_cache.shape[3])):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != heads or t.shape[3] != dim:
            raise ValueError(f"{name}: expected shape (B, L_new, H, {'E' if name == 'k' else 'Ev'})"
                             f" = ({batch}, L_new, {heads}, {dim}), got {shape_text(t)}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v: expected L_new={k.shape[1]} rows as k, got {shape_text(v)}")
    return k.shape[1]


def _check_values(batch: int, cache_seqlens, leftpad, batch_idx, new_len: int, capacity: int,
                  batch_cache: Optional[int], paged: bool):
    """Range checks of the per-sequence integers (one host sync). Returns host lists."""
    rows = [cache_seqlens] + [t for t in (leftpad, batch_idx) if t is not None]
    host = torch.stack(rows).tolist() if len(rows) > 1 else [cache_seqlens.tolist()]
    seqlens = host[0]
    pads = host[1] if leftpad is not None else [0] * batch
    idx = host[-1] if batch_idx is not None else None
    where = "block_table's max_blocks * page_size" if paged else "S_max"
    for b, n in enumerate(seqlens):
        if n < 0:
            raise ValueError(f"cache_seqlens: expected values >= 0, got cache_seqlens[{b}] = {n}")
        if n + new_len > capacity:
            raise ValueError(
                f"cache_seqlens: cache_seqlens[{b}] + L_new = {n} + {new_len} exceeds the cache's "
                f"capacity ({where} = {capacity})")
        if not 0 <= pads[b] <= n:
            raise ValueError(f"cache_leftpad: expected 0 <= cache_leftpad[b] <= cache_seqlens[b], "
                             f"got cache_leftpad[{b}] = {pads[b]} with cache_seqlens[{b}] = {n}")
    if idx is not None:
        for b, row in enumerate(idx):
            if not 0 <= row < batch_cache:
                raise ValueError(f"cache_batch_idx: expected values in [0, B_cache = {batch_cache}),"
                                 f" got cache_batch_idx[{b}] = {row}")
        if new_len > 0 and len(set(idx)) != len(idx):
            raise ValueError("cache_batch_idx: repeated cache rows with k/v appended would write "
                             f"one row twice, got {idx}")
    return seqlens, pads


def _check_block_table(block_table, cache_seqlens, new_len: int, page_size: int,
                       num_blocks: int) -> None:
    """Every block a sequence uses (its first cache_seqlens + L_new positions) is a valid block
    index (one reduction on the device, one sync)."""
    used = (cache_seqlens + new_len + page_size - 1) // page_size  # blocks per sequence
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    in_use = columns[None, :] < used[:, None]
    bad = in_use & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0].tolist())
        raise ValueError(f"block_table: expected block indices in [0, num_blocks = {num_blocks}) "
                         f"for the blocks in use, got block_table[{b}, {j}] = "
                         f"{int(block_table[b, j])}")


def check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                  cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_size,
                  softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse,
                  sinks) -> KVCacheArgs:
    """flash_attn_with_kvcache's arguments (SPEC section 12); raises TypeError / ValueError
    naming the argument. Returns the validated call."""
    check_tensor("q", q)
    check_float_dtype("q", q)
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims (B, Lq, Hq, E), got {shape_text(q)}")
    if q.shape[3] == 0:
        raise ValueError(f"q: expected head dim E >= 1, got {shape_text(q)}")
    batch = q.shape[0]
    capacity, paged = _check_caches(q, k_cache, v_cache, block_table, batch)
    new_len = _check_new(k, v, q, k_cache, v_cache, batch)
    _check_grad_free((("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                      ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("sinks", sinks)))
    rotary_dim = _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, k, q.shape[3])

    if cache_seqlens is None:
        if new_len > 0:
            raise ValueError("cache_seqlens: required when k/v are appended (where would they go?)")
        cache_seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, Tensor):
        _int_vector("cache_seqlens", cache_seqlens, batch, q)
    else:
        check_int("cache_seqlens", cache_seqlens, 0)
        cache_seqlens = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    if cache_leftpad is not None:
        _int_vector("cache_leftpad", cache_leftpad, batch, q)
    batch_cache = None
    if cache_batch_idx is not None:
        if paged:
            raise ValueError("cache_batch_idx: not supported with block_table (the block table "
                             "already maps each sequence to its pages)")
        _int_vector("cache_batch_idx", cache_batch_idx, batch, q)
        batch_cache = k_cache.shape[0]
    elif not paged and k_cache.shape[0] < batch:
        raise ValueError(f"k_cache: expected B_cache >= B = {batch} rows (cache row b serves "
                         f"batch b without cache_batch_idx), got {shape_text(k_cache)}")

    try:  # the same rule as `scale`, under flash-attn's name for it
        scale = check_scale(softmax_scale, q.shape[3])
    except (TypeError, ValueError) as err:
        raise type(err)("softmax_" + str(err)) from None
    check_bool("causal", causal)
    left, right = check_window("window_size", window_size)
    if causal:
        right = 0
    softcap = check_softcap(softcap)
    slopes = check_alibi_slopes(alibi_slopes, batch, q.shape[2], q, "q")
    check_sinks(sinks, q.shape[2], q, "q")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits: expected an int >= 0 (0 = auto), got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0 = auto), got {num_splits}")
    check_bool("return_softmax_lse", return_softmax_lse)

    seqlens, pads = _check_values(batch, cache_seqlens, cache_leftpad, cache_batch_idx, new_len,
                                  capacity, batch_cache, paged)
    if paged and batch > 0:
        _check_block_table(block_table, cache_seqlens, new_len, k_cache.shape[1], k_cache.shape[0])
    if rotary_dim:
        # k at cache_seqlens[b] + i; q there too when causal/windowed, else at cache_seqlens[b]
        q_rows = q.shape[1] if (left >= 0 or right >= 0) else min(q.shape[1], 1)
        needed = max((n + max(new_len, q_rows) for n in seqlens), default=0)
        if rotary_cos.shape[0] < needed:
            raise ValueError(f"rotary_cos: expected at least {needed} rows (the positions "
                             f"rotated, up to cache_seqlens + L_new / Lq), got {shape_text(rotary_cos)}")
    return KVCacheArgs(batch, new_len, paged, cache_seqlens, seqlens, cache_leftpad, pads,
                       cache_batch_idx, scale, (left, right), softcap, slopes, int(num_splits))
