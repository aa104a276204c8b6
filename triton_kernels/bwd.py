"""Backward kernels, FlashAttention-2 style, over the same packed problem as the forward.

Stages (see MATH.md):
  1. _bwd_preprocess, per (query tile, batch*head, stream s): Delta = rowsum(dO * O) ("joint"),
     or, per peer, U_p = sum_j P_pj v_pj recomputed from the saved log-sum-exp and
     Delta_p = <dO * g_p, U_p> ("peer"); the gate gradient dO * U_p is reduced per tile here.
  2. _bwd_dkdv, key/value-major, per (key tile, batch*kv head, peer p): loops over every query
     tile of every stream that attends to p and every query head of the GQA group, so dK/dV
     are owned by one program each (no atomics).
  3. _bwd_dq, query-major: dQ, the bias gradient (reduced per tile) and the float mask gradient.
Partial per-tile buffers are summed with torch afterwards (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import MIN_BLOCK_M, interpreter_meta, tune_len, tuned
from .fwd import kernel_flags, num_row_tiles, shared_args
from .tiles import LOG2E, dropout_keep, key_bounds, masked_scores, mma, row_tile, to_io
from .utils import INTERPRET, dropout_args


@triton.jit
def _row_lse2(Lse, lse_off, rows, row_ok):
    """Saved log-sum-exp in log2 units; +inf for empty rows so that their weights exp2(z - lse)
    are exactly 0 (never exp(-inf + inf) = NaN)."""
    lse = tl.load(Lse + lse_off + rows, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _bwd_preprocess(
    Q, K, V, Out, DOut, Lse, Delta, DGatePart, QOff, KVOff, Peers, Gate, Bias, KVLen, Mask,
    seed, rng_offset, dropout_p, scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qe,
    stride_kb, stride_kh, stride_kt, stride_ke,
    stride_vb, stride_vh, stride_vt, stride_ve,
    stride_ob, stride_oh, stride_ot, stride_oe,
    stride_dob, stride_doh, stride_dot, stride_doe,
    stride_lb, stride_lh, stride_ls,
    stride_pgt, stride_pgb, stride_pgs, stride_pgp, stride_pgh,
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge,
    stride_bb, stride_bs, stride_bp, stride_bh,
    stride_klb, stride_kls,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, group_size, num_streams, Tq, Tk, E, EV, TUNE_LEN,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KVLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, PEER_MODE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, F32_DOT: tl.constexpr, BF16_RTNE: tl.constexpr,
    NEED_DGATE: tl.constexpr, EXACT_DELTA: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h, kvh, s, q_start, q_len, m_start = row_tile(QOff, num_q_heads, group_size, BLOCK_M)
    if m_start >= q_len:  # the grid covers the longest stream
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    row_ok = offs_m < q_len
    ev_ok = offs_ev < EV
    rows = q_start + offs_m
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None] * stride_dot + offs_ev[None, :] * stride_doe,
                 mask=row_ok[:, None] & ev_ok[None, :], other=0.0).to(tl.float32)
    if not PEER_MODE and not EXACT_DELTA:  # the FlashAttention identity: Delta = <dO, O>
        o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                    + rows[:, None] * stride_ot + offs_ev[None, :] * stride_oe,
                    mask=row_ok[:, None] & ev_ok[None, :], other=0.0).to(tl.float32)
        tl.store(Delta + b * stride_lb + h * stride_lh + rows, tl.sum(do * o, 1), mask=row_ok)

    # U_p = sum_j P_pj v_pj of every attended peer, recomputed in fp32 (P is not rounded to the
    # input dtype: the gate/bias gradients are long sums that would accumulate that rounding).
    # EXACT_DELTA ("joint" with a gate or bias gradient): Delta = sum_p <dO * g_p, U_p> instead
    # of <dO, O> with O rounded to the output dtype.
    if PEER_MODE or NEED_DGATE or EXACT_DELTA:
        delta = tl.zeros([BLOCK_M], tl.float32)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + rows[:, None] * stride_qt + offs_e[None, :] * stride_qe,
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        k_head = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_head = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        mask_rows = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
            + rows[:, None] * stride_mq
        lse2 = _row_lse2(Lse, b * stride_lb + h * stride_lh, rows, row_ok)
        for p in range(0, num_streams):
            if tl.load(Peers + s * num_streams + p) != 0:
                kv_start, kv_end = key_bounds(KVOff, KVLen, stride_klb, stride_kls, b, p, s,
                                              m_start, HAS_KVLEN, IS_CAUSAL, BLOCK_M)
                if PEER_MODE:
                    lse2 = _row_lse2(Lse, b * stride_lb + h * stride_lh + p * stride_ls, rows,
                                     row_ok)
                bias_log2 = 0.0
                if HAS_BIAS:
                    bias_log2 = tl.load(Bias + b * stride_bb + s * stride_bs + p * stride_bp
                                        + h * stride_bh).to(tl.float32) * LOG2E
                u = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
                for n_start in range(0, kv_end, BLOCK_N):
                    offs_n = n_start + tl.arange(0, BLOCK_N)
                    key_ok = offs_n < kv_end
                    kT = tl.load(k_head + (kv_start + offs_n)[None, :] * stride_kt
                                 + offs_e[:, None] * stride_ke,
                                 mask=key_ok[None, :] & (offs_e[:, None] < E), other=0.0)
                    qk = mma(q, kT, F32_DOT) * scale_log2
                    qk = masked_scores(qk, offs_m, offs_n, m_start, n_start, kv_end, p == s,
                                       bias_log2, mask_rows + (kv_start + offs_n)[None, :] * stride_mk,
                                       row_ok[:, None] & key_ok[None, :],
                                       HAS_BIAS, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
                    probs = tl.exp2(qk - lse2[:, None])
                    if HAS_DROPOUT:
                        keep = dropout_keep(seed, rng_offset, bh, rows, kv_start + offs_n, Tq, Tk,
                                            dropout_p)
                        probs = tl.where(keep, probs / (1.0 - dropout_p), 0.0)
                    v = tl.load(v_head + (kv_start + offs_n)[:, None] * stride_vt
                                + offs_ev[None, :] * stride_ve,
                                mask=key_ok[:, None] & ev_ok[None, :], other=0.0)
                    u += mma(probs, v.to(tl.float32), True)
                gate = tl.full([EV_PAD], 1.0, tl.float32)
                if HAS_GATE:
                    gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp
                                   + h * stride_gh + offs_ev * stride_ge,
                                   mask=ev_ok, other=0.0).to(tl.float32)
                if PEER_MODE:  # Delta_p = <dO * g_p, U_p>
                    tl.store(Delta + b * stride_lb + h * stride_lh + p * stride_ls + rows,
                             tl.sum(do * gate[None, :] * u, 1), mask=row_ok)
                else:
                    delta += tl.sum(do * gate[None, :] * u, 1)
                if NEED_DGATE:  # dg_p = sum over rows of dO * U_p, one partial per tile
                    tl.store(DGatePart + pid_m * stride_pgt + b * stride_pgb + s * stride_pgs
                             + p * stride_pgp + h * stride_pgh + offs_ev,
                             tl.sum(do * u, 0), mask=ev_ok)
        if EXACT_DELTA:
            tl.store(Delta + b * stride_lb + h * stride_lh + rows, delta, mask=row_ok)


@triton.jit
def _bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, DBiasPart, DMask, QOff, KVOff, Peers, Gate, Bias, KVLen, Mask,
    seed, rng_offset, dropout_p, scale_log2, scale,
    stride_qb, stride_qh, stride_qt, stride_qe,
    stride_kb, stride_kh, stride_kt, stride_ke,
    stride_vb, stride_vh, stride_vt, stride_ve,
    stride_dob, stride_doh, stride_dot, stride_doe,
    stride_lb, stride_lh, stride_ls,
    stride_dqb, stride_dqh, stride_dqt, stride_dqe,
    stride_pbt, stride_pbb, stride_pbs, stride_pbp, stride_pbh,
    stride_dmb, stride_dmh, stride_dmq, stride_dmk,
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge,
    stride_bb, stride_bs, stride_bp, stride_bh,
    stride_klb, stride_kls,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, group_size, num_streams, Tq, Tk, E, EV, TUNE_LEN,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KVLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, PEER_MODE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, F32_DOT: tl.constexpr, BF16_RTNE: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DMASK: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h, kvh, s, q_start, q_len, m_start = row_tile(QOff, num_q_heads, group_size, BLOCK_M)
    if m_start >= q_len:  # the grid covers the longest stream
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    row_ok = offs_m < q_len
    ev_ok = offs_ev < EV
    rows = q_start + offs_m
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows[:, None] * stride_qt + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None] * stride_dot + offs_ev[None, :] * stride_doe,
                 mask=row_ok[:, None] & ev_ok[None, :], other=0.0)
    k_head = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    mask_rows = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
        + rows[:, None] * stride_mq
    dmask_rows = DMask + b.to(tl.int64) * stride_dmb + h.to(tl.int64) * stride_dmh \
        + rows[:, None] * stride_dmq
    stats_off = b * stride_lb + h * stride_lh
    lse2 = _row_lse2(Lse, stats_off, rows, row_ok)
    delta = tl.load(Delta + stats_off + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, E_PAD], tl.float32)

    for p in range(0, num_streams):
        if tl.load(Peers + s * num_streams + p) != 0:
            kv_start, kv_end = key_bounds(KVOff, KVLen, stride_klb, stride_kls, b, p, s, m_start,
                                          HAS_KVLEN, IS_CAUSAL, BLOCK_M)
            if PEER_MODE:  # this peer's own softmax statistics
                lse2 = _row_lse2(Lse, stats_off + p * stride_ls, rows, row_ok)
                delta = tl.load(Delta + stats_off + p * stride_ls + rows, mask=row_ok, other=0.0)
            bias_log2 = 0.0
            if HAS_BIAS:
                bias_log2 = tl.load(Bias + b * stride_bb + s * stride_bs + p * stride_bp
                                    + h * stride_bh).to(tl.float32) * LOG2E
            do_gated = do  # dP_pj = <dO * g_p, v_pj>
            if HAS_GATE:
                gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp + h * stride_gh
                               + offs_ev * stride_ge, mask=ev_ok, other=0.0).to(tl.float32)
                do_gated = to_io(do.to(tl.float32) * gate[None, :], do.dtype, BF16_RTNE)
            dbias = tl.zeros([BLOCK_M], tl.float32)
            for n_start in range(0, kv_end, BLOCK_N):
                offs_n = n_start + tl.arange(0, BLOCK_N)
                key_ok = offs_n < kv_end
                kT = tl.load(k_head + (kv_start + offs_n)[None, :] * stride_kt
                             + offs_e[:, None] * stride_ke,
                             mask=key_ok[None, :] & (offs_e[:, None] < E), other=0.0)
                vT = tl.load(v_head + (kv_start + offs_n)[None, :] * stride_vt
                             + offs_ev[:, None] * stride_ve,
                             mask=key_ok[None, :] & (offs_ev[:, None] < EV), other=0.0)
                qk = mma(q, kT, F32_DOT) * scale_log2
                qk = masked_scores(qk, offs_m, offs_n, m_start, n_start, kv_end, p == s, bias_log2,
                                   mask_rows + (kv_start + offs_n)[None, :] * stride_mk,
                                   row_ok[:, None] & key_ok[None, :],
                                   HAS_BIAS, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
                probs = tl.exp2(qk - lse2[:, None])
                dp = mma(do_gated, vT, F32_DOT)
                if HAS_DROPOUT:
                    keep = dropout_keep(seed, rng_offset, bh, rows, kv_start + offs_n, Tq, Tk,
                                        dropout_p)
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                ds = probs * (dp - delta[:, None])  # dz, the gradient of the natural-log scores
                if NEED_DQ:
                    dq += mma(to_io(ds, kT.dtype, BF16_RTNE), tl.trans(kT), F32_DOT)
                if NEED_DBIAS:
                    dbias += tl.sum(ds, 1)
                if NEED_DMASK:
                    tl.store(dmask_rows + (kv_start + offs_n)[None, :] * stride_dmk,
                             to_io(ds, DMask.dtype.element_ty, BF16_RTNE), mask=row_ok[:, None] & key_ok[None, :])
            if NEED_DBIAS:
                tl.store(DBiasPart + pid_m * stride_pbt + b * stride_pbb + s * stride_pbs
                         + p * stride_pbp + h * stride_pbh, tl.sum(dbias, 0))

    if NEED_DQ:
        tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
                 + rows[:, None] * stride_dqt + offs_e[None, :] * stride_dqe,
                 to_io(dq * scale, DQ.dtype.element_ty, BF16_RTNE), mask=row_ok[:, None] & (offs_e[None, :] < E))


@triton.jit
def _bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV, QOff, KVOff, Peers, Gate, Bias, KVLen, Mask,
    seed, rng_offset, dropout_p, scale_log2, scale,
    stride_qb, stride_qh, stride_qt, stride_qe,
    stride_kb, stride_kh, stride_kt, stride_ke,
    stride_vb, stride_vh, stride_vt, stride_ve,
    stride_dob, stride_doh, stride_dot, stride_doe,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dkh, stride_dkt, stride_dke,
    stride_dvb, stride_dvh, stride_dvt, stride_dve,
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge,
    stride_bb, stride_bs, stride_bp, stride_bh,
    stride_klb, stride_kls,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, group_size, num_streams, Tq, Tk, E, EV, TUNE_LEN,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KVLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, PEER_MODE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, F32_DOT: tl.constexpr, BF16_RTNE: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    p = tl.program_id(2)
    num_kv_heads = num_q_heads // group_size
    b = bkv // num_kv_heads
    kvh = bkv % num_kv_heads
    kv_start = tl.load(KVOff + p)
    kv_len = tl.load(KVOff + p + 1) - kv_start
    n_start = pid_n * BLOCK_N
    if n_start >= kv_len:
        return
    kv_end = kv_len
    if HAS_KVLEN:
        kv_end = tl.minimum(kv_end, tl.load(KVLen + b * stride_klb + p * stride_kls).to(tl.int32))
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    key_ok = offs_n < kv_end
    ev_ok = offs_ev < EV
    keys = kv_start + offs_n
    kT = tl.load(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                 + keys[None, :] * stride_kt + offs_e[:, None] * stride_ke,
                 mask=key_ok[None, :] & (offs_e[:, None] < E), other=0.0)
    vT = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
                 + keys[None, :] * stride_vt + offs_ev[:, None] * stride_ve,
                 mask=key_ok[None, :] & ev_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, E_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, EV_PAD], tl.float32)

    if n_start < kv_end:  # padding keys (kv_lengths) get zero gradients
        for s in range(0, num_streams):
            if tl.load(Peers + s * num_streams + p) != 0:  # every stream that attends to p
                q_start = tl.load(QOff + s)
                q_len = tl.load(QOff + s + 1) - q_start
                m_lo = n_start * 0  # (a tensor, like the value the branch below may give)
                if IS_CAUSAL:
                    if s == p:  # query tiles wholly above the diagonal see none of these keys
                        m_lo = (n_start // BLOCK_M) * BLOCK_M
                for hh in range(0, group_size):  # GQA: every query head sharing this K/V head
                    h = kvh * group_size + hh
                    bh = b * num_q_heads + h
                    stats_off = b * stride_lb + h * stride_lh
                    if PEER_MODE:
                        stats_off += p * stride_ls
                    bias_log2 = 0.0
                    if HAS_BIAS:
                        bias_log2 = tl.load(Bias + b * stride_bb + s * stride_bs + p * stride_bp
                                            + h * stride_bh).to(tl.float32) * LOG2E
                    gate = tl.full([EV_PAD], 1.0, tl.float32)
                    if HAS_GATE:
                        gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp
                                       + h * stride_gh + offs_ev * stride_ge,
                                       mask=ev_ok, other=0.0).to(tl.float32)
                    for m_start in range(m_lo, q_len, BLOCK_M):
                        offs_m = m_start + tl.arange(0, BLOCK_M)
                        row_ok = offs_m < q_len
                        rows = q_start + offs_m
                        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                                    + rows[:, None] * stride_qt + offs_e[None, :] * stride_qe,
                                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
                        do = tl.load(DOut + b.to(tl.int64) * stride_dob
                                     + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dot
                                     + offs_ev[None, :] * stride_doe,
                                     mask=row_ok[:, None] & ev_ok[None, :], other=0.0)
                        if HAS_GATE:
                            do = to_io(do.to(tl.float32) * gate[None, :], do.dtype, BF16_RTNE)
                        lse2 = _row_lse2(Lse, stats_off, rows, row_ok)
                        delta = tl.load(Delta + stats_off + rows, mask=row_ok, other=0.0)
                        qk = mma(q, kT, F32_DOT) * scale_log2
                        qk = masked_scores(
                            qk, offs_m, offs_n, m_start, n_start, kv_end, s == p, bias_log2,
                            Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                            + rows[:, None] * stride_mq + keys[None, :] * stride_mk,
                            row_ok[:, None] & key_ok[None, :],
                            HAS_BIAS, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
                        probs = tl.exp2(qk - lse2[:, None])
                        dp = mma(do, vT, F32_DOT)
                        probs_kept = probs
                        if HAS_DROPOUT:
                            keep = dropout_keep(seed, rng_offset, bh, rows, keys, Tq, Tk, dropout_p)
                            probs_kept = tl.where(keep, probs / (1.0 - dropout_p), 0.0)
                            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                        dv += mma(tl.trans(to_io(probs_kept, do.dtype, BF16_RTNE)), do, F32_DOT)
                        ds = probs * (dp - delta[:, None])
                        dk += mma(tl.trans(to_io(ds, q.dtype, BF16_RTNE)), q, F32_DOT)

    out_rows = offs_n < kv_len
    tl.store(DK + b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh
             + keys[:, None] * stride_dkt + offs_e[None, :] * stride_dke,
             to_io(dk * scale, DK.dtype.element_ty, BF16_RTNE), mask=out_rows[:, None] & (offs_e[None, :] < E))
    tl.store(DV + b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh
             + keys[:, None] * stride_dvt + offs_ev[None, :] * stride_dve,
             to_io(dv, DV.dtype.element_ty, BF16_RTNE), mask=out_rows[:, None] & ev_ok[None, :])


_bwd_preprocess_tuned = tuned(_bwd_preprocess)
_bwd_dq_tuned = tuned(_bwd_dq)
_bwd_dkdv_tuned = tuned(_bwd_dkdv, backward=True)


def _wanted(problem, needs_grad):
    need_q, need_k, need_v, need_gate, need_bias, need_mask = (bool(x) for x in needs_grad[:6])
    need_gate = need_gate and problem.gate is not None
    need_bias = need_bias and problem.bias is not None
    need_mask = (need_mask and problem.attn_mask is not None
                 and problem.attn_mask.dtype != torch.bool)
    return need_q, need_k, need_v, need_gate, need_bias, need_mask


def gradient_buffers(problem, needs_grad):
    """Zeroed outputs of the backward kernels: dq, dk, dv, dmask, the per-tile gate/bias partials."""
    q, k, v = problem.q, problem.k, problem.v
    need_q, need_k, need_v, need_gate, need_bias, need_mask = _wanted(problem, needs_grad)
    empty = q.new_empty(0)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format) if need_q else empty
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format) if (need_k or need_v) else empty
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format) if (need_k or need_v) else empty
    mask = problem.attn_mask
    dmask = torch.zeros(mask.shape, dtype=mask.dtype, device=q.device) if need_mask else empty
    tiles = num_row_tiles(problem, MIN_BLOCK_M)
    dgate_part = (torch.zeros((tiles,) + tuple(problem.gate.shape), dtype=torch.float32,
                              device=q.device) if need_gate else empty)
    dbias_part = (torch.zeros((tiles,) + tuple(problem.bias.shape), dtype=torch.float32,
                              device=q.device) if need_bias else empty)
    return dict(dq=dq, dk=dk, dv=dv, dmask=dmask, dgate_part=dgate_part, dbias_part=dbias_part,
                delta=torch.zeros(0))


def backward_launches(problem, grad_out, out, lse, needs_grad, bufs):
    """[(name, kernel, args, kwargs, grid)] of the backward, in launch order: the one place the
    arguments are assembled, shared by backward() and the compile report (compile_check)."""
    q, k, v = problem.q, problem.k, problem.v
    need_q, need_k, need_v, need_gate, need_bias, need_mask = _wanted(problem, needs_grad)
    batch, num_q_heads, q_total, _ = q.shape
    num_kv_heads, kv_total = k.shape[1], k.shape[2]
    num_streams = problem.num_streams
    peer_mode = problem.normalize == "peer"
    dq, dk, dv, dmask = bufs["dq"], bufs["dk"], bufs["dv"], bufs["dmask"]
    dgate_part, dbias_part = bufs["dgate_part"], bufs["dbias_part"]
    tensors, strides = shared_args(problem)
    seed, rng_offset, dropout_p = dropout_args(problem)
    flags = kernel_flags(problem)
    meta = interpreter_meta() if INTERPRET else {}
    delta = bufs["delta"] = torch.zeros_like(lse)
    stats_strides = (lse.stride(0), lse.stride(1), lse.stride(2) if peer_mode else 0)
    scale_log2 = problem.scale * 1.4426950408889634
    sizes = (num_q_heads, num_q_heads // num_kv_heads, num_streams, q_total, kv_total,
             problem.head_dim, problem.value_dim,
             tune_len(max(max(problem.q_lens), max(problem.kv_lens))))
    part_strides = lambda t: tuple(t.stride())[:5] if t.numel() else (0,) * 5  # noqa: E731

    def row_grid(META):
        return (num_row_tiles(problem, META["BLOCK_M"]), batch * num_q_heads, num_streams)

    def key_grid(META):
        return (triton.cdiv(max(problem.kv_lens), META["BLOCK_N"]), batch * num_kv_heads, num_streams)

    launches = [("preprocess", _bwd_preprocess, (
        q, k, v, out, grad_out, lse, delta, dgate_part if need_gate else lse, *tensors,
        seed, rng_offset, dropout_p, scale_log2,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
        *stats_strides, *part_strides(dgate_part), *strides, *sizes),
        dict(flags, NEED_DGATE=need_gate,
             EXACT_DELTA=not peer_mode and (need_gate or need_bias) and problem.dropout_p == 0,
             **meta), row_grid)]
    if need_q or need_bias or need_mask:
        launches.append(("dq", _bwd_dq, (
            q, k, v, grad_out, lse, delta, dq if need_q else q,
            dbias_part if need_bias else lse, dmask if need_mask else q, *tensors,
            seed, rng_offset, dropout_p, scale_log2, problem.scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *stats_strides,
            *(dq.stride() if need_q else (0,) * 4), *part_strides(dbias_part),
            *(dmask.stride() if need_mask else (0,) * 4), *strides, *sizes),
            dict(flags, NEED_DQ=need_q, NEED_DBIAS=need_bias, NEED_DMASK=need_mask, **meta),
            row_grid))
    if need_k or need_v:
        launches.append(("dkdv", _bwd_dkdv, (
            q, k, v, grad_out, lse, delta, dk, dv, *tensors,
            seed, rng_offset, dropout_p, scale_log2, problem.scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *stats_strides,
            *dk.stride(), *dv.stride(), *strides, *sizes), dict(flags, **meta), key_grid))
    return launches


TUNED = {"preprocess": _bwd_preprocess_tuned, "dq": _bwd_dq_tuned, "dkdv": _bwd_dkdv_tuned}


def backward(problem, grad_out, out, lse, needs_grad):
    q, k = problem.q, problem.k
    need_q, need_k, need_v, need_gate, need_bias, need_mask = _wanted(problem, needs_grad)
    bufs = gradient_buffers(problem, needs_grad)
    empty = q.new_empty(0)
    if q.shape[2] > 0 and k.shape[2] > 0 and q.shape[0] * q.shape[1] > 0:
        for name, _, args, kwargs, grid in backward_launches(problem, grad_out, out, lse,
                                                            needs_grad, bufs):
            TUNED[name][grid](*args, **kwargs)
    dgate = bufs["dgate_part"].sum(0).to(problem.gate.dtype) if need_gate else empty
    dbias = bufs["dbias_part"].sum(0).to(problem.bias.dtype) if need_bias else empty
    return (bufs["dq"] if need_q else empty, bufs["dk"] if need_k else empty,
            bufs["dv"] if need_v else empty, dgate, dbias,
            bufs["dmask"])
