"""Split-KV decode kernels (flash-decoding) over a contiguous or paged KV cache.

A decode call has few query rows (Lq <= 16) and many keys: one program per (batch, head) would
leave most of a GPU idle and read the cache once per query head. Here:

  * _decode_split, grid (num_splits, B * H_kv, row blocks): the query rows of one KV head are
    packed into the tile's rows (row r = query i * G + group member g, G = Hq / H), so the KV
    head's keys are read once for all its query heads (GQA/MQA without copies). The visible key
    range of the tile (window/causal aligned to the sequence's key count) is cut into num_splits
    contiguous pieces of whole BLOCK_N tiles; each program runs the online softmax over its piece
    and writes a normalised partial output and its log-sum-exp (-inf when empty). Keys are read
    through pointers: a contiguous cache row (cache_batch_idx), or per key the block of the block
    table (any page size). Offsets are 64-bit.
  * _decode_merge, one program per output row: O = sum_s exp(lse_s - L) O_s with
    L = logsumexp(lse_s, sink); written in the output's dtype and strides, with L.
  * num_splits == 1: _decode_split finishes the row itself (sink, normalisation, store): no
    merge launch, no partial buffers.

The partials of every split are combined exactly (up to rounding): num_splits changes speed only.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import scale_args
from .tiles import LN2, LOG2E, mma, tanh, to_io
from .utils import INTERPRET, f32_dot, padded_dim

# launches (and a hook for tests: the drop-in's dispatch counts decode launches through it)
MAX_QUERY_ROWS = 16      # the drop-in routes calls with L <= this to the decode kernels
MIN_DECODE_KEYS = 128    # ... over at least this many keys
MAX_SPLITS = 128
MAX_GRID_Y = 65535


@triton.jit
def _decode_split(
    Q, K, V, BlockTable, BatchIdx, LeftPad, SeqLens, Alibi, Sinks, PartO, PartL, Out, Lse,
    stride_qb, stride_qt, stride_qh, stride_qe,
    stride_kb, stride_kt, stride_kh, stride_ke,
    stride_vb, stride_vt, stride_vh, stride_ve,
    stride_btb, stride_btn, stride_ab, stride_ah,
    stride_ob, stride_ot, stride_oh, stride_oe,
    stride_lb, stride_lh, stride_lt,
    q_len, num_q_heads, num_kv_heads, group, num_splits, page_size, E, EV, left, right,
    scale_log2, softcap_scale,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    BAND: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, DIRECT: tl.constexpr,
    F32_DOT: tl.constexpr, BF16_RTNE: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // num_kv_heads
    kvh = bkv % num_kv_heads
    b64 = b.to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (query, group) rows
    row_ok = rows < q_len * group
    qi = rows // group
    h = kvh * group + rows % group
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    q = tl.load(Q + b64 * stride_qb + qi.to(tl.int64)[:, None] * stride_qt
                + h.to(tl.int64)[:, None] * stride_qh + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)

    n_keys = tl.load(SeqLens + b)
    off = n_keys * 0
    if BOTTOM_RIGHT:  # the diagonal ends at the sequence's last key
        off = n_keys - q_len
    # the keys some row of this tile may see, cut into num_splits pieces of whole tiles
    lo = n_keys * 0
    hi = n_keys
    if BAND:
        qi_first = (tl.program_id(2) * BLOCK_M) // group
        qi_last = (tl.minimum(tl.program_id(2) * BLOCK_M + BLOCK_M, q_len * group) - 1) // group
        if left >= 0:
            lo = tl.maximum(qi_first + off - left, 0)
        if right >= 0:
            hi = tl.minimum(hi, qi_last + off + right + 1)
    hi = tl.maximum(hi, lo)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)

    alibi2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        alibi2 = tl.load(Alibi + b * stride_ab + h * stride_ah, mask=row_ok,
                         other=0.0).to(tl.float32) * LOG2E
    pad = 0
    if HAS_LEFTPAD:
        pad = tl.load(LeftPad + b)
    if PAGED:
        table = BlockTable + b64 * stride_btb
        k_base = K + kvh.to(tl.int64) * stride_kh
        v_base = V + kvh.to(tl.int64) * stride_vh
    else:
        row = b64
        if HAS_BATCH_IDX:
            row = tl.load(BatchIdx + b).to(tl.int64)
        k_base = K + row * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = V + row * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        kj = n_start + tl.arange(0, BLOCK_N)  # key positions within the sequence
        key_ok = kj < end
        pos = (kj + pad).to(tl.int64)  # cache positions
        if PAGED:  # each key's block from the table: any page size
            block = tl.load(table + (pos // page_size) * stride_btn, mask=key_ok, other=0)
            k_rows = block.to(tl.int64) * stride_kb + (pos % page_size) * stride_kt
            v_rows = block.to(tl.int64) * stride_vb + (pos % page_size) * stride_vt
        else:
            k_rows = pos * stride_kt
            v_rows = pos * stride_vt
        k = tl.load(k_base + k_rows[:, None] + offs_e[None, :] * stride_ke,
                    mask=key_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        qk = mma(q, tl.trans(k), F32_DOT)
        if SOFTCAP:
            z = tanh(qk * softcap_scale) * scale_log2
        else:
            z = qk * scale_log2
        d = kj[None, :] - (qi[:, None] + off)  # the key's distance from the aligned diagonal
        if HAS_ALIBI:
            z -= alibi2[:, None] * tl.abs(d).to(tl.float32)
        ok = key_ok[None, :] & row_ok[:, None]
        if BAND:
            if right >= 0:
                ok = ok & (d <= right)
            if left >= 0:
                ok = ok & (d >= -left)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        probs = tl.exp2(z - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        v = tl.load(v_base + v_rows[:, None] + offs_ev[None, :] * stride_ve,
                    mask=key_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        acc = acc * alpha[:, None] + mma(to_io(probs, v.dtype, BF16_RTNE), v, F32_DOT)
        m_i = m_new

    ev_ok = row_ok[:, None] & (offs_ev[None, :] < EV)
    if DIRECT:  # the only split: the sink joins the normaliser, then the final row
        if HAS_SINKS:
            sink2 = tl.load(Sinks + h, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
            m_new = tl.maximum(m_i, sink2)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.exp2(sink2 - m_new)
            acc = acc * alpha[:, None]
            m_i = m_new
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # empty rows give 0
        out = to_io(acc * inv[:, None], Out.dtype.element_ty, BF16_RTNE)
        tl.store(Out + b64 * stride_ob + qi.to(tl.int64)[:, None] * stride_ot
                 + h.to(tl.int64)[:, None] * stride_oh + offs_ev[None, :] * stride_oe, out,
                 mask=ev_ok)
        tl.store(Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + qi * stride_lt,
                 (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
    else:  # partials, contiguous (split, b, h, i, e): the merge reads them
        batch = tl.num_programs(1) // num_kv_heads
        part_row = ((split * batch + b).to(tl.int64) * num_q_heads + h) * q_len + qi
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        tl.store(PartO + part_row[:, None] * EV + offs_ev[None, :], acc * inv[:, None],
                 mask=ev_ok)
        tl.store(PartL + part_row, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _decode_merge(
    PartO, PartL, Sinks, Out, Lse,
    stride_ob, stride_ot, stride_oh, stride_oe, stride_lb, stride_lh, stride_lt,
    rows_per_split, q_len, num_q_heads, num_splits, EV,
    HAS_SINKS: tl.constexpr, BF16_RTNE: tl.constexpr,
    SPLITS_PAD: tl.constexpr, EV_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, h, i) flattened, i fastest
    qi = row % q_len
    h = (row // q_len) % num_q_heads
    b = row // (q_len * num_q_heads)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    s_ok = offs_s < num_splits
    part = offs_s.to(tl.int64) * rows_per_split + row
    lse = tl.load(PartL + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + h).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(lse - m_safe)
    total = tl.sum(weights, 0)
    if HAS_SINKS:
        total += tl.exp(sink - m_safe)
    parts = tl.load(PartO + part[:, None] * EV + offs_ev[None, :],
                    mask=s_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    out = tl.sum(parts * weights[:, None], 0) * inv
    tl.store(Out + b * stride_ob + qi * stride_ot + h * stride_oh + offs_ev * stride_oe,
             to_io(out, Out.dtype.element_ty, BF16_RTNE), mask=offs_ev < EV)
    tl.store(Lse + b * stride_lb + h * stride_lh + qi * stride_lt, m_safe + tl.log(total))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def auto_splits(programs: int, key_tiles: int, sm_count: int) -> int:
    """Enough splits for about two programs per SM (decode is bound by memory bandwidth: every SM
    must be streaming the cache, with a second program to hide its latency), each split keeping
    at least two key tiles (the merge's cost stays small against the reads)."""
    wanted = -(-2 * sm_count // max(programs, 1))
    return max(1, min(wanted, key_tiles // 2, MAX_SPLITS))


def launch_config(problem):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): rows for the packed (query, group) tile; key
    tiles of 64 (32 for head dims above 128). 8 warps for 64-row tiles and 2 stages for head dims
    above 128 keep the tile in registers and shared memory on every target (compiled for sm_80,
    sm_86 and sm_90a: E=256 with 64 rows and 4 warps spills; 8 warps do not, and 2 stages stay
    under sm_86's 99 KiB). The interpreter uses 16-key tiles (more tiles per test)."""
    rows = problem.q.shape[1] * (problem.num_q_heads // problem.num_kv_heads)
    block_m = max(16, min(64, triton.next_power_of_2(max(rows, 1))))
    big = max(problem.head_dim, problem.value_dim) > 128
    warps = 8 if block_m == 64 else 4
    if INTERPRET:
        return block_m, 16, warps, 1
    return block_m, 32 if big else 64, warps, 2 if big else 3


def num_splits_for(problem, programs: int, block_n: int) -> int:
    key_tiles = triton.cdiv(max(problem.max_seqlen, 1), block_n)
    if problem.num_splits > 0:  # as asked (splits past the keys are empty and merge as nothing)
        return min(problem.num_splits, MAX_SPLITS)
    if INTERPRET or problem.q.device.type != "cuda":
        return 1 if key_tiles < 4 else 2
    return auto_splits(programs, key_tiles, _sm_count(problem.q.device.index or 0))


def decode_launches(problem, out, lse):
    """[(kernel, grid, args, kwargs)] of a decode call (the split kernel, then the merge when
    there are several splits): the one place the arguments are assembled, shared by
    decode_attention and compile checks."""
    q = problem.q
    batch, q_len, num_q_heads, _ = q.shape
    num_kv_heads = problem.num_kv_heads
    group = num_q_heads // num_kv_heads
    ev = problem.value_dim
    block_m, block_n, warps, stages = launch_config(problem)
    row_blocks = triton.cdiv(q_len * group, block_m)
    splits = num_splits_for(problem, batch * num_kv_heads * row_blocks, block_n)
    direct = splits == 1
    if direct:
        part_o = part_l = lse  # unread
    else:
        part_o = torch.empty(splits, batch, num_q_heads, q_len, ev, dtype=torch.float32,
                             device=q.device)
        part_l = torch.empty(splits, batch, num_q_heads, q_len, dtype=torch.float32,
                             device=q.device)
    kc, vc = problem.k_cache, problem.v_cache
    dummy = problem.seqlens
    table = problem.block_table if problem.paged else dummy
    slopes, sinks = problem.alibi_slopes, problem.sinks
    softcap = problem.softcap
    scale_log2, softcap_scale = scale_args(softcap, problem.scale)
    left, right = problem.window_left, problem.window_right
    rtne = INTERPRET and q.dtype == torch.bfloat16
    split_args = (
        q, kc, vc, table,
        problem.batch_idx if problem.batch_idx is not None else dummy,
        problem.leftpad if problem.leftpad is not None else dummy, problem.seqlens,
        slopes if slopes is not None else dummy, sinks if sinks is not None else dummy,
        part_o, part_l, out, lse,
        *q.stride(), *kc.stride(), *vc.stride(),
        *(table.stride() if problem.paged else (0, 0)),
        *(slopes.stride() if slopes is not None else (0, 0)),
        *out.stride(), *lse.stride(),
        q_len, num_q_heads, num_kv_heads, group, splits, kc.shape[1],
        problem.head_dim, ev, left, right, scale_log2, softcap_scale)
    split_kwargs = dict(
        PAGED=problem.paged, HAS_BATCH_IDX=problem.batch_idx is not None,
        HAS_LEFTPAD=problem.leftpad is not None, BAND=left >= 0 or right >= 0,
        BOTTOM_RIGHT=bool(problem.bottom_right), SOFTCAP=softcap > 0,
        HAS_ALIBI=slopes is not None, HAS_SINKS=sinks is not None, DIRECT=direct,
        F32_DOT=f32_dot(q.dtype, padded_dim(problem.head_dim), padded_dim(ev)),
        BF16_RTNE=rtne, E_PAD=padded_dim(problem.head_dim),
        EV_PAD=padded_dim(ev), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages)
    launches = [(_decode_split, (splits, batch * num_kv_heads, row_blocks), split_args,
                 split_kwargs)]
    if not direct:
        rows = batch * num_q_heads * q_len
        merge_args = (part_o, part_l, sinks if sinks is not None else dummy, out, lse,
                      *out.stride(), *lse.stride(), rows, q_len, num_q_heads, splits, ev)
        merge_kwargs = dict(HAS_SINKS=sinks is not None, BF16_RTNE=rtne,
                            SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
                            EV_PAD=padded_dim(ev))
        launches.append((_decode_merge, (rows,), merge_args, merge_kwargs))
    return launches


def decode_attention(problem, out=None, lse=None):
    """(out, lse) of a DecodeProblem (peer_attention.decode_problem): out (B, Lq, Hq, Ev) in q's
    dtype (or written into the given `out`, any strides), lse (B, Hq, Lq) float32."""
    q = problem.q
    batch, q_len, num_q_heads, _ = q.shape
    if out is None:
        out = torch.empty(batch, q_len, num_q_heads, problem.value_dim, dtype=q.dtype,
                          device=q.device)
    if lse is None:
        lse = torch.empty(batch, num_q_heads, q_len, dtype=torch.float32, device=q.device)
    if batch == 0 or q_len == 0:
        return out, lse
    for kernel, grid, args, kwargs in decode_launches(problem, out, lse):
        kernel[grid](*args, **kwargs)
    return out, lse
