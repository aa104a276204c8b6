"""Backward kernels, FlashAttention-2 style, over the same packed problem as the forward.

Stages (see MATH.md):
  1. _bwd_preprocess, per (stream s, query tile) and batch*head: Delta = rowsum(dO * O)
     ("joint"), or, per peer, U_p = sum_j P_pj v_pj recomputed from the saved log-sum-exp and
     Delta_p = <dO * g_p, U_p> ("peer"); the gate gradient dO * U_p is reduced per tile here.
  2. _bwd_dkdv, key-major, per (stream p, key tile) and batch*kv head: loops over the query tiles
     of every stream that attends to p and every query head of the GQA group, so dK/dV are owned
     by one program each (no atomics). It computes S^T = K Q^T directly (keys as rows), so P^T
     and dS^T feed the dV and dK products without a transpose.
  3. _bwd_dq, query-major: dQ, the bias gradient (reduced per tile) and the float mask gradient.
Full tiles run without positional masks, boundary tiles (window/causal edges, kv end) with them,
as in the forward. Partial per-tile buffers and the sink gradient
dsink_h = -sum_i P_sink(i) Delta_i are reduced with torch afterwards (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..problem import mask_grad_shape
from .configs import tuned
from .launch import (common_args, head_dims, kernel_flags, meta, num_row_tiles, strides,
                     tune_len_of, use_tma)
from .tiles import (LOG2E, attended_peer, attended_peers, dropout_keep, find_tile, key_stages,
                    kv_extent, mma, probs_from_lse, query_stages, row_tile, to_io)
from .utils import TILE_SIZES, f32_dot, launch_device, num_tiles, stream_tables, tma_ok


@triton.jit
def _row_lse2(Lse, lse_off, rows, row_ok):
    """Saved log-sum-exp in log2 units; +inf for empty rows so that their weights exp2(z - lse)
    are exactly 0 (never exp(-inf + inf) = NaN)."""
    lse = tl.load(Lse + lse_off + rows, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _exact_pv(probs, v, F32_DOT: tl.constexpr):
    """probs @ v without rounding fp32 probs to the input dtype: as hi + lo halves in the input
    dtype (two tensor-core products, ~16 significant bits of P) instead of an fp32 FMA product
    (no tensor cores, and a register file's worth of operands)."""
    if F32_DOT != 0:
        return mma(probs, v, F32_DOT)
    else:
        hi = probs.to(v.dtype)
        lo = (probs - hi.to(tl.float32)).to(v.dtype)
        return tl.dot(hi, v) + tl.dot(lo, v)


@triton.jit
def _bias2(Bias, stride_bb, stride_bs, stride_bp, stride_bh, b, s, p, h, HAS_BIAS: tl.constexpr):
    """The pair's bias in log2 units: subtracted from the saved lse, it adds to every score."""
    if HAS_BIAS:
        return tl.load(Bias + b * stride_bb + s * stride_bs + p * stride_bp
                       + h * stride_bh).to(tl.float32) * LOG2E
    else:
        return 0.0


# The gate/bias gradients are reduced per query tile into partial slots of PART_ROWS rows (the
# smallest tile), summed by torch afterwards (deterministic, no atomics). A program of BLOCK_M
# rows writes its sum into its first slot and zeros into its other BLOCK_M // PART_ROWS - 1, so
# every config writes every slot any config writes: triton.autotune runs all candidates on the
# same buffers, and nothing a config with smaller tiles left there may survive into the result.
PART_ROWS = tl.constexpr(min(TILE_SIZES))

# NEED_DMASK of the dQ kernel: how the float mask gradient dS reaches its buffer. A mask that is
# broadcast (stride 0) along some dims gets a buffer of its own shape (problem.mask_grad_shape,
# float32) that the programs add into with atomics, through strides that are 0 on those dims; a
# query-broadcast mask (a key padding row) sums each tile's rows first, one add per column.
# Under torch.use_deterministic_algorithms the buffer is dense and summed by torch afterwards.
DMASK_STORE = tl.constexpr(1)      # one element per score: a plain store
DMASK_ADD = tl.constexpr(2)        # broadcast over batch and/or heads (or keys): atomic adds
DMASK_ADD_ROWS = tl.constexpr(3)   # broadcast over queries too: a column sum per tile, then adds


def partial_slots(problem) -> int:
    """Slots of the per-tile partial buffers: the longest stream in tiles of the largest size,
    PART_ROWS rows a slot (the zeros a program writes past its stream's end stay in bounds)."""
    largest = max(TILE_SIZES)
    return num_row_tiles(problem, largest) * (largest // PART_ROWS)


@triton.jit
def _part_offset(m_start, b, s, p, h, stride_t, stride_b, stride_s, stride_p, stride_h):
    """Offset of the (b, s, p, h) entry of the first partial slot of the tile at m_start, 64-bit
    (slots x gate size passes 2^31 at long lengths)."""
    return ((m_start // PART_ROWS).to(tl.int64) * stride_t + b.to(tl.int64) * stride_b
            + s * stride_s + p * stride_p + h * stride_h)


@triton.jit
def _pair_offset(q_len, kv_len, BOTTOM_RIGHT: tl.constexpr):
    if BOTTOM_RIGHT:  # the diagonal ends at the last key: off = M_s - L_s
        return kv_len - q_len
    else:
        return q_len * 0


@triton.jit
def _bwd_preprocess(
    Q, K, V, Out, DOut, Lse, Delta, DGatePart, tables, optional, rng, scales,
    q_strides, k_strides, v_strides, o_strides, do_strides, lse_strides, pg_strides,
    opt_strides, sizes, TUNE_LEN,
    F: tl.constexpr, USE_TMA: tl.constexpr, NEED_DGATE: tl.constexpr, EXACT_DELTA: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The arguments' bundles: see launch.py (F: launch.Flags)."""
    QOff, KVOff, TileOff, PeerStart, PeerList = tables
    Gate, Bias, KVLen, Mask, Alibi, Sinks = optional
    seed, rng_offset, dropout_p = rng
    scale_log2, softcap_scale = scales
    stride_qb, stride_qh, stride_qt, stride_qe = q_strides
    stride_kb, stride_kh, stride_kt, stride_ke = k_strides
    stride_vb, stride_vh, stride_vt, stride_ve = v_strides
    stride_ob, stride_oh, stride_ot, stride_oe = o_strides
    stride_dob, stride_doh, stride_dot, stride_doe = do_strides
    stride_lb, stride_lh, stride_ls = lse_strides
    stride_pgt, stride_pgb, stride_pgs, stride_pgp, stride_pgh = pg_strides
    gate_strides, bias_strides, kvlen_strides, mask_strides, alibi_strides = opt_strides
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge = gate_strides
    stride_bb, stride_bs, stride_bp, stride_bh = bias_strides
    stride_klb, stride_kls = kvlen_strides
    stride_mb, stride_mh, stride_mq, stride_mk = mask_strides
    stride_ab, stride_ah = alibi_strides
    num_q_heads, group_size, num_streams, steps, Tq, Tk, E, EV, left, right = sizes
    bh = tl.program_id(1)
    b, h, kvh, s, q_start, q_len, m_start = row_tile(
        QOff, TileOff + (BLOCK_M // 16 - 1) * (num_streams + 1), num_q_heads, group_size,
        num_streams, steps, BLOCK_M)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    row_ok = offs_m < q_len
    ev_ok = offs_ev < EV
    rows = q_start + offs_m
    # 64-bit offsets to the tile's first row, its own rows 32-bit (as in the forward)
    row0 = (q_start + m_start).to(tl.int64)
    tile_m = tl.arange(0, BLOCK_M)
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + row0 * stride_dot + tile_m[:, None] * stride_dot
                 + offs_ev[None, :] * stride_doe,
                 mask=row_ok[:, None] & ev_ok[None, :], other=0.0).to(tl.float32)
    if not F.PEER_MODE and not EXACT_DELTA:  # the FlashAttention identity: Delta = <dO, O>
        o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                    + row0 * stride_ot + tile_m[:, None] * stride_ot
                    + offs_ev[None, :] * stride_oe,
                    mask=row_ok[:, None] & ev_ok[None, :], other=0.0).to(tl.float32)
        tl.store(Delta + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + rows,
                 tl.sum(do * o, 1), mask=row_ok)

    # U_p = sum_j P_pj v_pj of every attended peer, recomputed in fp32 (P is not rounded to the
    # input dtype: the gate/bias gradients are long sums that would accumulate that rounding).
    # EXACT_DELTA ("joint" with a gate or bias gradient): Delta = sum_p <dO * g_p, U_p> instead
    # of <dO, O> with O rounded to the output dtype.
    if F.PEER_MODE or NEED_DGATE or EXACT_DELTA:
        tile_n = tl.arange(0, BLOCK_N)
        stats_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
        delta = tl.zeros([BLOCK_M], tl.float32)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + row0 * stride_qt + tile_m[:, None] * stride_qt
                    + offs_e[None, :] * stride_qe,
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        k_head = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_head = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        mask_rows = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
            + row0 * stride_mq + tile_m[:, None] * stride_mq
        alibi2 = 0.0
        if F.HAS_ALIBI:
            alibi2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32) * LOG2E
        lse2 = _row_lse2(Lse, stats_off, rows, row_ok)
        peer_lo, peer_hi = attended_peers(PeerStart, s, F.DIAGONAL)
        for i in range(peer_lo, peer_hi):
            p = attended_peer(PeerList, i, s, F.DIAGONAL)
            kv_start, kv_len, kv_end = kv_extent(KVOff, KVLen, stride_klb, stride_kls, b, p,
                                                 F.HAS_KVLEN)
            off = _pair_offset(q_len, kv_len, F.BOTTOM_RIGHT)
            n0, n_a, n_b, n_hi = key_stages(m_start, q_len, kv_end, p == s, off, left, right,
                                            F.BAND, BLOCK_M, BLOCK_N)
            if F.PEER_MODE:
                lse2 = _row_lse2(Lse, stats_off + p * stride_ls, rows, row_ok)
            lse2_p = lse2 - _bias2(Bias, stride_bb, stride_bs, stride_bp, stride_bh, b, s, p, h,
                                   F.HAS_BIAS)
            u = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
            for n_start in range(n0, n_hi, BLOCK_N):
                offs_n = n_start + tile_n
                key_ok = offs_n < kv_end
                key0 = kv_start + tl.cast(n_start, tl.int64)
                k = tl.load(k_head + key0 * stride_kt + tile_n[:, None] * stride_kt
                            + offs_e[None, :] * stride_ke,
                            mask=key_ok[:, None] & (offs_e[None, :] < E), other=0.0)
                probs, dcap = probs_from_lse(
                    mma(q, tl.trans(k), F.F32_DOT), offs_m[:, None], offs_n[None, :],
                    lse2_p[:, None], p == s, off, left, right, kv_end, alibi2, scale_log2,
                    softcap_scale,
                    mask_rows + key0 * stride_mk + tile_n[None, :] * stride_mk,
                    row_ok[:, None] & key_ok[None, :], True, F.BAND, F.HAS_ALIBI, F.MASK_KIND,
                    F.SOFTCAP)
                if F.HAS_DROPOUT:
                    keep = dropout_keep(seed, rng_offset, bh, rows, kv_start + n_start, Tq, Tk,
                                        dropout_p, BLOCK_M, BLOCK_N)
                    probs = tl.where(keep, probs / (1.0 - dropout_p), 0.0)
                v = tl.load(v_head + key0 * stride_vt + tile_n[:, None] * stride_vt
                            + offs_ev[None, :] * stride_ve,
                            mask=key_ok[:, None] & ev_ok[None, :], other=0.0)
                u += _exact_pv(probs, v, F.F32_DOT)
            gate = tl.full([EV_PAD], 1.0, tl.float32)
            if F.HAS_GATE:
                gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp
                               + h * stride_gh + offs_ev * stride_ge,
                               mask=ev_ok, other=0.0).to(tl.float32)
            if F.PEER_MODE:  # Delta_p = <dO * g_p, U_p>
                tl.store(Delta + stats_off + p * stride_ls + rows,
                         tl.sum(do * gate[None, :] * u, 1), mask=row_ok)
            else:
                delta += tl.sum(do * gate[None, :] * u, 1)
            if NEED_DGATE:  # dg_p = sum over rows of dO * U_p, one partial per tile
                sub = tl.arange(0, BLOCK_M // PART_ROWS)[:, None]
                tl.store(DGatePart + _part_offset(m_start, b, s, p, h, stride_pgt, stride_pgb,
                                                  stride_pgs, stride_pgp, stride_pgh)
                         + (sub * stride_pgt + offs_ev[None, :]),
                         tl.where(sub == 0, tl.sum(do * u, 0)[None, :], 0.0),
                         mask=(sub >= 0) & ev_ok[None, :])
        if EXACT_DELTA:
            tl.store(Delta + stats_off + rows, delta, mask=row_ok)


@triton.jit
def _dq_tiles(dq, dbias, q, do_gated, lse2, delta, k_desc, v_desc, k_ptrs, v_ptrs, n_lo, n_hi, qi,
              rows, row_ok, bh, pair, mask_rows, dmask_rows, row_strides, rng, scales, sizes,
              F: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
              NEED_DQ: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DMASK: tl.constexpr,
              E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """dQ (and the bias/mask gradients) over key tiles [n_lo, n_hi) of one peer. pair:
    (kv_start, kv_end, self_pair, off, left, right, alibi2); row_strides: (stride_kt, stride_vt,
    stride_mk, stride_dmk)."""
    kv_start, kv_end, self_pair, off, left, right, alibi2 = pair
    stride_kt, stride_vt, stride_mk, stride_dmk = row_strides
    seed, rng_offset, dropout_p = rng
    scale_log2, softcap_scale = scales
    Tq, Tk, E, EV = sizes[4], sizes[5], sizes[6], sizes[7]
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tile_n
        n64 = tl.cast(n_start, tl.int64)  # (64-bit: a long stream's rows x stride > 2^31)
        key_ok = offs_n < kv_end
        k_ok = offs_e[None, :] < E
        v_ok = offs_ev[None, :] < EV
        if MASKED:
            k_ok = k_ok & key_ok[:, None]
            v_ok = v_ok & key_ok[:, None]
        if USE_TMA:
            k = k_desc.load([n_start, 0])
            v = v_desc.load([n_start, 0])
        else:
            k = tl.load(k_ptrs + n64 * stride_kt + tile_n[:, None] * stride_kt, mask=k_ok,
                        other=0.0)
            v = tl.load(v_ptrs + n64 * stride_vt + tile_n[:, None] * stride_vt, mask=v_ok,
                        other=0.0)
        probs, dcap = probs_from_lse(
            mma(q, tl.trans(k), F.F32_DOT), qi, offs_n[None, :], lse2[:, None], self_pair, off,
            left, right, kv_end, alibi2, scale_log2, softcap_scale,
            mask_rows + (kv_start + n64) * stride_mk + tile_n[None, :] * stride_mk,
            row_ok[:, None] & key_ok[None, :], MASKED, F.BAND, F.HAS_ALIBI, F.MASK_KIND, F.SOFTCAP)
        dp = mma(do_gated, tl.trans(v), F.F32_DOT)
        if F.HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, rows, kv_start + n_start, Tq, Tk,
                                dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = probs * (dp - delta[:, None])  # dz, the gradient of the natural-log scores
        if NEED_DQ:
            dq += mma(to_io(ds * dcap, k.dtype, F.BF16_RTNE), k, F.F32_DOT)
        if NEED_DBIAS:
            dbias += tl.sum(ds, 1)
        if NEED_DMASK:
            dmask_ptrs = dmask_rows + (kv_start + n64) * stride_dmk + tile_n[None, :] * stride_dmk
            if NEED_DMASK == DMASK_STORE:
                tl.store(dmask_ptrs, to_io(ds, dmask_rows.dtype.element_ty, F.BF16_RTNE),
                         mask=row_ok[:, None] & key_ok[None, :])
            else:  # a broadcast mask: added into its own-shape buffer (stride 0 where broadcast)
                ds = tl.where(row_ok[:, None] & key_ok[None, :], ds, 0.0)
                if NEED_DMASK == DMASK_ADD_ROWS:  # broadcast over queries: one add per column
                    first = tile_m[:, None] == 0
                    tl.atomic_add(dmask_ptrs, tl.where(first, tl.sum(ds, 0)[None, :], 0.0),
                                  mask=first & key_ok[None, :], sem="relaxed")
                else:
                    tl.atomic_add(dmask_ptrs, ds, mask=row_ok[:, None] & key_ok[None, :],
                                  sem="relaxed")
    return dq, dbias


@triton.jit
def _bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, DBiasPart, DMask, tables, optional, rng, scales, scale,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dq_strides, pb_strides,
    dm_strides, opt_strides, sizes, TUNE_LEN,
    F: tl.constexpr, USE_TMA: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DBIAS: tl.constexpr,
    NEED_DMASK: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The arguments' bundles: see launch.py (F: launch.Flags)."""
    QOff, KVOff, TileOff, PeerStart, PeerList = tables
    Gate, Bias, KVLen, Mask, Alibi, Sinks = optional
    stride_qb, stride_qh, stride_qt, stride_qe = q_strides
    stride_kb, stride_kh, stride_kt, stride_ke = k_strides
    stride_vb, stride_vh, stride_vt, stride_ve = v_strides
    stride_dob, stride_doh, stride_dot, stride_doe = do_strides
    stride_lb, stride_lh, stride_ls = lse_strides
    stride_dqb, stride_dqh, stride_dqt, stride_dqe = dq_strides
    stride_pbt, stride_pbb, stride_pbs, stride_pbp, stride_pbh = pb_strides
    stride_dmb, stride_dmh, stride_dmq, stride_dmk = dm_strides
    gate_strides, bias_strides, kvlen_strides, mask_strides, alibi_strides = opt_strides
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge = gate_strides
    stride_bb, stride_bs, stride_bp, stride_bh = bias_strides
    stride_klb, stride_kls = kvlen_strides
    stride_mb, stride_mh, stride_mq, stride_mk = mask_strides
    stride_ab, stride_ah = alibi_strides
    num_q_heads, group_size, num_streams, steps, Tq, Tk, E, EV, left, right = sizes
    bh = tl.program_id(1)
    b, h, kvh, s, q_start, q_len, m_start = row_tile(
        QOff, TileOff + (BLOCK_M // 16 - 1) * (num_streams + 1), num_q_heads, group_size,
        num_streams, steps, BLOCK_M)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    row_ok = offs_m < q_len
    ev_ok = offs_ev < EV
    rows = q_start + offs_m
    row0 = (q_start + m_start).to(tl.int64)  # 64-bit to the tile, 32-bit within (as forward)
    tile_m = tl.arange(0, BLOCK_M)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + row0 * stride_qt + tile_m[:, None] * stride_qt + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + row0 * stride_dot + tile_m[:, None] * stride_dot
                 + offs_ev[None, :] * stride_doe,
                 mask=row_ok[:, None] & ev_ok[None, :], other=0.0)
    k_head = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    mask_rows = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
        + row0 * stride_mq + tile_m[:, None] * stride_mq
    dmask_rows = DMask + b.to(tl.int64) * stride_dmb + h.to(tl.int64) * stride_dmh \
        + row0 * stride_dmq + tile_m[:, None] * stride_dmq
    alibi2 = 0.0
    if F.HAS_ALIBI:
        alibi2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32) * LOG2E
    stats_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    lse2 = _row_lse2(Lse, stats_off, rows, row_ok)
    delta = tl.load(Delta + stats_off + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, E_PAD], tl.float32)
    qi = offs_m[:, None]
    row_strides = (stride_kt, stride_vt, stride_mk, stride_dmk)

    peer_lo, peer_hi = attended_peers(PeerStart, s, F.DIAGONAL)
    for i in range(peer_lo, peer_hi):
        p = attended_peer(PeerList, i, s, F.DIAGONAL)
        kv_start, kv_len, kv_end = kv_extent(KVOff, KVLen, stride_klb, stride_kls, b, p,
                                             F.HAS_KVLEN)
        off = _pair_offset(q_len, kv_len, F.BOTTOM_RIGHT)
        self_pair = p == s
        bounds = key_stages(m_start, q_len, kv_end, self_pair, off, left, right, F.BAND, BLOCK_M,
                            BLOCK_N)
        if F.PEER_MODE:  # this peer's own softmax statistics
            lse2 = _row_lse2(Lse, stats_off + p * stride_ls, rows, row_ok)
            delta = tl.load(Delta + stats_off + p * stride_ls + rows, mask=row_ok, other=0.0)
        lse2_p = lse2 - _bias2(Bias, stride_bb, stride_bs, stride_bp, stride_bh, b, s, p, h,
                               F.HAS_BIAS)
        do_gated = do  # dP_pj = <dO * g_p, v_pj>
        if F.HAS_GATE:
            gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp + h * stride_gh
                           + offs_ev * stride_ge, mask=ev_ok, other=0.0).to(tl.float32)
            do_gated = to_io(do.to(tl.float32) * gate[None, :], do.dtype, F.BF16_RTNE)
        k_ptrs = k_head + kv_start.to(tl.int64) * stride_kt + offs_e[None, :] * stride_ke
        v_ptrs = v_head + kv_start.to(tl.int64) * stride_vt + offs_ev[None, :] * stride_ve
        k_desc = k_head
        v_desc = v_head
        if USE_TMA:  # per (batch, kv head, peer): keys past the peer's end read as zeros
            k_desc = tl.make_tensor_descriptor(k_head + kv_start.to(tl.int64) * stride_kt,
                                               shape=[kv_len, E],
                                               strides=[stride_kt, 1],
                                               block_shape=[BLOCK_N, E_PAD])
            v_desc = tl.make_tensor_descriptor(v_head + kv_start.to(tl.int64) * stride_vt,
                                               shape=[kv_len, EV],
                                               strides=[stride_vt, 1],
                                               block_shape=[BLOCK_N, EV_PAD])
        dbias = tl.zeros([BLOCK_M], tl.float32)
        pair = (kv_start, kv_end, self_pair, off, left, right, alibi2)
        for stage in tl.static_range(3):  # boundary, full (mask-free), boundary
            dq, dbias = _dq_tiles(
                dq, dbias, q, do_gated, lse2_p, delta, k_desc, v_desc, k_ptrs, v_ptrs,
                bounds[stage], bounds[stage + 1], qi, rows, row_ok, bh, pair, mask_rows,
                dmask_rows, row_strides, rng, scales, sizes, F, stage != 1, USE_TMA, NEED_DQ,
                NEED_DBIAS, NEED_DMASK, E_PAD, EV_PAD, BLOCK_M, BLOCK_N)
        if NEED_DBIAS:
            sub = tl.arange(0, BLOCK_M // PART_ROWS)
            tl.store(DBiasPart + _part_offset(m_start, b, s, p, h, stride_pbt, stride_pbb,
                                              stride_pbs, stride_pbp, stride_pbh)
                     + sub * stride_pbt, tl.where(sub == 0, tl.sum(dbias, 0), 0.0))

    if NEED_DQ:
        tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
                 + row0 * stride_dqt + tile_m[:, None] * stride_dqt + offs_e[None, :] * stride_dqe,
                 to_io(dq * scale, DQ.dtype.element_ty, F.BF16_RTNE),
                 mask=row_ok[:, None] & (offs_e[None, :] < E))


@triton.jit
def _dkdv_tiles(dk, dv, k, v, gate, q_desc, do_desc, q_head, do_head, lse_ptr, delta_ptr, m_lo,
                m_hi, q_start, q_len, offs_n, col0, key_ok, bh, pair, lse_shift, mask_head,
                row_strides, rng, scales, sizes,
                F: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
                E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr):
    """dK/dV of one key tile over query tiles [m_lo, m_hi) of one (stream, query head), keys as
    rows: S^T = K Q^T, P^T feeds dV += P^T dO and dS^T feeds dK += dS^T Q directly. pair:
    (kv_start, kv_end, self_pair, off, left, right, alibi2); row_strides: (stride_qt,
    stride_dot, stride_mq, stride_mk). DO_DK / DO_DV: which of the two products this pass
    accumulates (the dV pass needs neither dP^T nor Delta)."""
    kv_start, kv_end, self_pair, off, left, right, alibi2 = pair
    stride_qt, stride_dot, stride_mq, stride_mk = row_strides
    seed, rng_offset, dropout_p = rng
    scale_log2, softcap_scale = scales
    Tq, Tk, E, EV = sizes[4], sizes[5], sizes[6], sizes[7]
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    for m_start in range(m_lo, m_hi, BLOCK_M):
        offs_m = m_start + tile_m
        row_ok = offs_m < q_len
        rows = q_start + offs_m
        row0 = q_start + tl.cast(m_start, tl.int64)  # 64-bit to the tile, 32-bit within
        q_ok = offs_e[None, :] < E
        do_ok = offs_ev[None, :] < EV
        if MASKED:
            q_ok = q_ok & row_ok[:, None]
            do_ok = do_ok & row_ok[:, None]
        if USE_TMA:
            q = q_desc.load([m_start, 0])
            do = do_desc.load([m_start, 0])
        else:
            q = tl.load(q_head + row0 * stride_qt + tile_m[:, None] * stride_qt, mask=q_ok,
                        other=0.0)
            do = tl.load(do_head + row0 * stride_dot + tile_m[:, None] * stride_dot, mask=do_ok,
                         other=0.0)
        if F.HAS_GATE:
            do = to_io(do.to(tl.float32) * gate[None, :], do.dtype, F.BF16_RTNE)
        if MASKED:
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
            if DO_DK:
                delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        else:  # a full tile: every row exists (no per-row predicates held in registers)
            lse = tl.load(lse_ptr + q_start + m_start + tile_m)
            if DO_DK:
                delta = tl.load(delta_ptr + q_start + m_start + tile_m)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E) - lse_shift
        probs_t, dcap = probs_from_lse(
            mma(k, tl.trans(q), F.F32_DOT), offs_m[None, :], offs_n[:, None], lse2[None, :],
            self_pair, off, left, right, kv_end, alibi2, scale_log2, softcap_scale,
            mask_head + row0 * stride_mq + tile_m[None, :] * stride_mq
            + col0.to(tl.int64) * stride_mk + tile_n[:, None] * stride_mk,
            row_ok[None, :] & key_ok[:, None], MASKED, F.BAND, F.HAS_ALIBI, F.MASK_KIND, F.SOFTCAP)
        kept_t = probs_t
        if F.HAS_DROPOUT:
            keep_t = tl.trans(dropout_keep(seed, rng_offset, bh, rows, col0, Tq, Tk, dropout_p,
                                           BLOCK_M, BLOCK_N))
            kept_t = tl.where(keep_t, probs_t / (1.0 - dropout_p), 0.0)
        if DO_DK:
            if MASKED or F.HAS_DROPOUT:
                dp_t = mma(v, tl.trans(do), F.F32_DOT)
                if F.HAS_DROPOUT:
                    dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
                dp_t -= delta[None, :]
            else:  # full tiles accumulate dP^T - Delta from -Delta (Delta not held next to dP^T)
                dp_t = mma(v, tl.trans(do), F.F32_DOT,
                           tl.broadcast_to(-delta[None, :], [BLOCK_N, BLOCK_M]))
        if DO_DV:
            dv += mma(to_io(kept_t, do.dtype, F.BF16_RTNE), do, F.F32_DOT)
        if DO_DK:
            ds_t = probs_t * dp_t * dcap
            dk += mma(to_io(ds_t, q.dtype, F.BF16_RTNE), q, F.F32_DOT)
    return dk, dv


@triton.jit
def _store_rows(Out, b, kvh, key0, tile_n, offs_e, out_strides, x, out_rows, e_ok,
                BF16_RTNE: tl.constexpr):
    """Store a key tile's gradient rows (dK or dV) in the output dtype."""
    stride_b, stride_h, stride_t, stride_e = out_strides
    tl.store(Out + b.to(tl.int64) * stride_b + kvh.to(tl.int64) * stride_h
             + key0 * stride_t + tile_n[:, None] * stride_t + offs_e[None, :] * stride_e,
             to_io(x, Out.dtype.element_ty, BF16_RTNE), mask=out_rows[:, None] & e_ok[None, :])


@triton.jit
def _bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV, tables, optional, rng, scales, scale,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dk_strides, dv_strides,
    opt_strides, sizes, TUNE_LEN,
    F: tl.constexpr, USE_TMA: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PHASES: tl.constexpr = 1,
):
    """The arguments' bundles: see launch.py (F: launch.Flags). PHASES (a config's): 1 computes
    dK and dV in one sweep over the query tiles; 2 sweeps twice, dV first (stored), then dK, so
    that only one of the two fp32 accumulators is live at a time: S^T is computed twice, but
    64-query tiles at head dim 128 fit wgmma's registers without spilling
    (docs/triton_compile_report.md)."""
    QOff, KVOff, TileOff, SrcStart, SrcList = tables
    Gate, Bias, KVLen, Mask, Alibi, Sinks = optional
    stride_qb, stride_qh, stride_qt, stride_qe = q_strides
    stride_kb, stride_kh, stride_kt, stride_ke = k_strides
    stride_vb, stride_vh, stride_vt, stride_ve = v_strides
    stride_dob, stride_doh, stride_dot, stride_doe = do_strides
    stride_lb, stride_lh, stride_ls = lse_strides
    gate_strides, bias_strides, kvlen_strides, mask_strides, alibi_strides = opt_strides
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge = gate_strides
    stride_bb, stride_bs, stride_bp, stride_bh = bias_strides
    stride_klb, stride_kls = kvlen_strides
    stride_mb, stride_mh, stride_mq, stride_mk = mask_strides
    stride_ab, stride_ah = alibi_strides
    num_q_heads, group_size, num_streams, steps, Tq, Tk, E, EV, left, right = sizes
    p, tile = find_tile(TileOff + (BLOCK_N // 16 - 1) * (num_streams + 1), tl.program_id(0),
                        num_streams, steps)
    bkv = tl.program_id(1)
    num_kv_heads = num_q_heads // group_size
    b = bkv // num_kv_heads
    kvh = bkv % num_kv_heads
    kv_start, kv_len, kv_end = kv_extent(KVOff, KVLen, stride_klb, stride_kls, b, p, F.HAS_KVLEN)
    n_start = tile * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    key_ok = offs_n < kv_end
    ev_ok = offs_ev < EV
    keys0 = kv_start + n_start
    key0 = keys0.to(tl.int64)  # 64-bit to the tile, 32-bit within (as the forward)
    tile_n = tl.arange(0, BLOCK_N)
    row_strides = (stride_qt, stride_dot, stride_mq, stride_mk)
    k = tl.load(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                + key0 * stride_kt + tile_n[:, None] * stride_kt + offs_e[None, :] * stride_ke,
                mask=key_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
                + key0 * stride_vt + tile_n[:, None] * stride_vt + offs_ev[None, :] * stride_ve,
                mask=key_ok[:, None] & ev_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, E_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, EV_PAD], tl.float32)

    out_rows = offs_n < kv_len
    for phase in tl.static_range(PHASES):  # PHASES == 2: phase 0 dV only, phase 1 dK only
        if n_start < kv_end:  # padding keys (kv_lengths) get zero gradients
            if F.DIAGONAL:
                src_lo = 0
                src_hi = 1
            else:
                src_lo = tl.load(SrcStart + p)
                src_hi = tl.load(SrcStart + p + 1)
            for i in range(src_lo, src_hi):  # every stream that attends to p
                if F.DIAGONAL:
                    s = p
                else:
                    s = tl.load(SrcList + i)
                q_start = tl.load(QOff + s)
                q_len = tl.load(QOff + s + 1) - q_start
                off = _pair_offset(q_len, kv_len, F.BOTTOM_RIGHT)
                self_pair = s == p
                bounds = query_stages(n_start, kv_end, q_len, self_pair, off, left, right, F.BAND,
                                      BLOCK_M, BLOCK_N)
                for hh in range(0, group_size):  # GQA: every query head sharing this K/V head
                    h = kvh * group_size + hh
                    bh = b * num_q_heads + h
                    stats_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
                    if F.PEER_MODE:
                        stats_off += p * stride_ls
                    bias2 = _bias2(Bias, stride_bb, stride_bs, stride_bp, stride_bh, b, s, p, h,
                                   F.HAS_BIAS)
                    alibi2 = 0.0
                    if F.HAS_ALIBI:
                        alibi2 = tl.load(Alibi + b * stride_ab
                                         + h * stride_ah).to(tl.float32) * LOG2E
                    gate = tl.full([EV_PAD], 1.0, tl.float32)
                    if F.HAS_GATE:
                        gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp
                                       + h * stride_gh + offs_ev * stride_ge,
                                       mask=ev_ok, other=0.0).to(tl.float32)
                    q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
                        + offs_e[None, :] * stride_qe
                    do_head = DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh \
                        + offs_ev[None, :] * stride_doe
                    mask_head = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                    q_desc = q_head
                    do_desc = do_head
                    if USE_TMA:  # per (batch, head, stream): rows past the stream's end read as 0
                        q_desc = tl.make_tensor_descriptor(
                            Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                            + q_start.to(tl.int64) * stride_qt, shape=[q_len, E],
                            strides=[stride_qt, 1],
                            block_shape=[BLOCK_M, E_PAD])
                        do_desc = tl.make_tensor_descriptor(
                            DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                            + q_start.to(tl.int64) * stride_dot, shape=[q_len, EV],
                            strides=[stride_dot, 1],
                            block_shape=[BLOCK_M, EV_PAD])
                    pair = (kv_start, kv_end, self_pair, off, left, right, alibi2)
                    for stage in tl.static_range(3):  # boundary, full (mask-free), boundary
                        dk, dv = _dkdv_tiles(
                            dk, dv, k, v, gate, q_desc, do_desc, q_head, do_head, Lse + stats_off,
                            Delta + stats_off, bounds[stage], bounds[stage + 1], q_start, q_len,
                            offs_n, keys0, key_ok, bh, pair, bias2, mask_head, row_strides, rng,
                            scales, sizes, F, stage != 1, USE_TMA, E_PAD, EV_PAD, BLOCK_M, BLOCK_N,
                            PHASES == 1 or phase == 1, PHASES == 1 or phase == 0)

        if PHASES == 2 and phase == 0:  # dV is done: its registers are free for dK's sweep
            _store_rows(DV, b, kvh, key0, tile_n, offs_ev, dv_strides, dv, out_rows, ev_ok,
                        F.BF16_RTNE)

    _store_rows(DK, b, kvh, key0, tile_n, offs_e, dk_strides, dk * scale, out_rows,
                offs_e < E, F.BF16_RTNE)
    if PHASES == 1:
        _store_rows(DV, b, kvh, key0, tile_n, offs_ev, dv_strides, dv, out_rows, ev_ok,
                    F.BF16_RTNE)


# the backward kernels, in the order the compile ledger hashes them (ledger.py)
KERNELS = (_bwd_dq, _bwd_dkdv, _bwd_preprocess)
_bwd_preprocess_tuned = tuned(_bwd_preprocess)
_bwd_dq_tuned = tuned(_bwd_dq, kind="dq")
_bwd_dkdv_tuned = tuned(_bwd_dkdv, kind="dkdv")
TUNED = {"preprocess": _bwd_preprocess_tuned, "dq": _bwd_dq_tuned, "dkdv": _bwd_dkdv_tuned}


def _wanted(problem, needs_grad):
    """(q, k, v, gate, bias, mask, sinks): the gradients asked for that exist."""
    need = [bool(x) for x in needs_grad] + [False] * (7 - len(needs_grad))
    need[3] = need[3] and problem.gate is not None
    need[4] = need[4] and problem.bias is not None
    need[5] = (need[5] and problem.attn_mask is not None
               and problem.attn_mask.dtype != torch.bool)
    need[6] = need[6] and problem.sinks is not None
    return need


def _dmask_buffer(mask, device):
    """The float mask gradient's buffer: dense in the mask's dtype when the mask broadcasts
    nowhere (or deterministic algorithms are asked for: summed afterwards), else float32 (float64
    for float64) at the mask's own shape (problem.mask_grad_shape), for the kernel's atomic adds."""
    compact = mask_grad_shape(mask)
    if compact == tuple(mask.shape):
        return torch.zeros(mask.shape, dtype=mask.dtype, device=device)
    accumulate = torch.float64 if mask.dtype == torch.float64 else torch.float32
    if torch.are_deterministic_algorithms_enabled():
        return torch.zeros(mask.shape, dtype=accumulate, device=device)
    return torch.zeros(compact, dtype=accumulate, device=device)


def _dmask_mode(mask, dmask):
    """NEED_DMASK for the dQ kernel (DMASK_*), and the buffer as the kernel indexes it: expanded
    to the mask's shape, stride 0 on the dims it is accumulated over."""
    if dmask.shape == mask.shape:
        return DMASK_STORE.value, dmask
    rows_broadcast = dmask.shape[2] == 1 and mask.shape[2] > 1
    return (DMASK_ADD_ROWS if rows_broadcast else DMASK_ADD).value, dmask.expand(mask.shape)


def gradient_buffers(problem, needs_grad):
    """Zeroed outputs of the backward kernels: dq, dk, dv, dmask and the per-tile gate/bias
    partials."""
    q, k, v = problem.q, problem.k, problem.v
    need_q, need_k, need_v, need_gate, need_bias, need_mask, _ = _wanted(problem, needs_grad)
    empty = q.new_empty(0)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format) if need_q else empty
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format) if (need_k or need_v) else empty
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format) if (need_k or need_v) else empty
    dmask = _dmask_buffer(problem.attn_mask, q.device) if need_mask else empty
    tiles = partial_slots(problem)
    dgate_part = (torch.zeros((tiles,) + tuple(problem.gate.shape), dtype=torch.float32,
                              device=q.device) if need_gate else empty)
    dbias_part = (torch.zeros((tiles,) + tuple(problem.bias.shape), dtype=torch.float32,
                              device=q.device) if need_bias else empty)
    return dict(dq=dq, dk=dk, dv=dv, dmask=dmask, dgate_part=dgate_part, dbias_part=dbias_part)


def backward_launches(problem, grad_out, out, lse, needs_grad, bufs):
    """[(name, kernel, args, kwargs, grid)] of the backward, in launch order, assembled from
    launch.py's bundles: shared by backward() and the compile report (compile_check). Leaves
    Delta in bufs["delta"]."""
    q = problem.q
    need_q, need_k, need_v, need_gate, need_bias, need_mask, need_sinks = _wanted(problem,
                                                                                  needs_grad)
    batch, num_q_heads = q.shape[:2]
    num_kv_heads = problem.k.shape[1]
    peer_mode = problem.normalize == "peer"
    dq, dk, dv, dmask = bufs["dq"], bufs["dk"], bufs["dv"], bufs["dmask"]
    dgate_part, dbias_part = bufs["dgate_part"], bufs["dbias_part"]
    delta = bufs["delta"] = torch.zeros_like(lse)
    tables = stream_tables(problem, q.device)
    rows = common_args(problem, (tables["q_off"], tables["kv_off"], tables["q_tiles"],
                                 tables["peer_start"], tables["peer_list"]), lse)
    keys = rows._replace(tables=(tables["q_off"], tables["kv_off"], tables["kv_tiles"],
                                 tables["src_start"], tables["src_list"]))
    flags = dict(F=kernel_flags(problem), USE_TMA=use_tma(problem, out) and tma_ok(grad_out),
                 **head_dims(problem), **meta())
    shared = (rows.q_strides, rows.k_strides, rows.v_strides)
    do_strides = tuple(grad_out.stride())
    tune = tune_len_of(problem)

    def row_grid(META):
        return (num_tiles(problem.q_lens, META["BLOCK_M"]), batch * num_q_heads)

    def key_grid(META):
        return (num_tiles(problem.kv_lens, META["BLOCK_N"]), batch * num_kv_heads)

    exact_delta = not peer_mode and (need_gate or need_bias) and problem.dropout_p == 0
    launches = [("preprocess", _bwd_preprocess, (
        q, problem.k, problem.v, out, grad_out, lse, delta, dgate_part if need_gate else lse,
        *rows[:4], *shared, tuple(out.stride()), do_strides, rows.lse_strides,
        strides(dgate_part, 5), rows.opt_strides, rows.sizes, tune),
        dict(flags, NEED_DGATE=need_gate, EXACT_DELTA=exact_delta), row_grid)]
    dmask_mode = 0
    if need_mask:
        dmask_mode, dmask = _dmask_mode(problem.attn_mask, dmask)
    if need_q or need_bias or need_mask:
        launches.append(("dq", _bwd_dq, (
            q, problem.k, problem.v, grad_out, lse, delta, dq if need_q else q,
            dbias_part if need_bias else lse, dmask if need_mask else q, *rows[:4],
            problem.scale, *shared, do_strides, rows.lse_strides, strides(dq, 4),
            strides(dbias_part, 5), strides(dmask, 4), rows.opt_strides, rows.sizes, tune),
            dict(flags, NEED_DQ=need_q, NEED_DBIAS=need_bias, NEED_DMASK=dmask_mode), row_grid))
    if need_k or need_v:
        launches.append(("dkdv", _bwd_dkdv, (
            q, problem.k, problem.v, grad_out, lse, delta, dk, dv, *keys[:4], problem.scale,
            *shared, do_strides, rows.lse_strides, strides(dk, 4), strides(dv, 4),
            rows.opt_strides, rows.sizes, tune),
            # the dK/dV kernel's own fp32 product precision (IEEE above head dim 128)
            dict(flags, F=flags["F"]._replace(F32_DOT=f32_dot(
                q.dtype, flags["E_PAD"], flags["EV_PAD"], "dkdv"))), key_grid))
    return launches


def sink_gradient(problem, lse, delta):
    """dsink_h = -sum_(b, i) P_sink(b, h, i) * Delta(b, h, i), P_sink = exp(sink_h - lse): the
    sink carries no value, so its dP is 0 (the saved lse includes the sink)."""
    sinks = problem.sinks
    p_sink = torch.exp(sinks.float()[None, :, None] - lse)
    return (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)


def backward(problem, grad_out, out, lse, needs_grad):
    """The seven gradients (dq, dk, dv, dgate, dbias, dmask, dsinks); empty where not asked."""
    q, k = problem.q, problem.k
    need_q, need_k, need_v, need_gate, need_bias, need_mask, need_sinks = _wanted(problem,
                                                                                  needs_grad)
    bufs = gradient_buffers(problem, needs_grad)
    empty = q.new_empty(0)
    delta = torch.zeros_like(lse)
    if q.shape[2] > 0 and q.shape[0] * q.shape[1] > 0:
        with launch_device(q):
            launches = backward_launches(problem, grad_out, out, lse, needs_grad, bufs)
            if k.shape[2] == 0:  # no keys: only Delta (for the sink gradient) has work to do
                launches = launches[:1]
            for name, _, args, kwargs, grid in launches:
                TUNED[name][grid](*args, **kwargs)
        delta = bufs["delta"]
    dgate = bufs["dgate_part"].sum(0).to(problem.gate.dtype) if need_gate else empty
    dbias = bufs["dbias_part"].sum(0).to(problem.bias.dtype) if need_bias else empty
    dsinks = sink_gradient(problem, lse, delta) if need_sinks else empty
    dmask = bufs["dmask"]
    if need_mask:  # (a dense accumulator of a broadcast mask: deterministic algorithms)
        mask = problem.attn_mask
        dmask = dmask.sum_to_size(mask_grad_shape(mask)).to(mask.dtype)
    return (bufs["dq"] if need_q else empty, bufs["dk"] if need_k else empty,
            bufs["dv"] if need_v else empty, dgate, dbias, dmask, dsinks)
