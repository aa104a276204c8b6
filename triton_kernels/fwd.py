"""Forward kernel: a program per (stream s, query tile) of a flat tile schedule, and batch*head.

For each peer p that stream s attends to (a compact list; p = s for the diagonal/varlen table)
the program runs one plain online softmax over p's key tiles (fp32 running max/sum, exp2, fp32
accumulator): boundary tiles (window/causal edges, the kv end) with positional masks, full tiles
in a mask-free loop. When the peer ends its partial result merges into the output state, which
is where the modes differ: "joint" merges log-sum-exps (the peer's bias and gate applied once,
here, not per tile; sinks start the state), "peer" adds the normalised, gated partial.

Q, K, V and O go through tensor descriptors (TMA on Hopper) built per (batch, head, stream), so
a stream's end is the descriptor's (zero padding past it) when the strides allow it; masked
pointer loads otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import tuned
from .launch import (common_args, head_dims, kernel_flags, mask_tma_ok, meta, one_accumulator,
                     tune_len_of, use_tma)
from .tiles import (LN2, LOG2E, attended_peer, attended_peers, dropout_keep, kv_extent,
                    key_stages, log2_scores, mask_scores, mma, row_tile, to_io)
from .utils import launch_device, mask_for_kernel, num_tiles, stream_tables


@triton.jit
def _peer_tiles(acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, n_lo, n_hi, qi, row_ok, q_rows,
                bh, pair, mask_rows, mask_row0, row_strides, rng, scales, sizes,
                F: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
                MASK_TMA: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax over key tiles [n_lo, n_hi) of one peer (MASKED: boundary tiles).
    pair: (kv_start, kv_end, self_pair, off, left, right, alibi2) of the (s, p) pair;
    row_strides: (stride_kt, stride_vt, stride_mk)."""
    kv_start, kv_end, self_pair, off, left, right, alibi2 = pair
    stride_kt, stride_vt, stride_mk = row_strides
    seed, rng_offset, dropout_p = rng
    scale_log2, softcap_scale = scales
    Tq, Tk, E, EV = sizes[4], sizes[5], sizes[6], sizes[7]
    SCORE_MOD: tl.constexpr = F.SOFTCAP or F.HAS_ALIBI or F.MASK_KIND == 2
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    # without a score modifier the scale is folded into the exp2 argument (one FFMA)
    if SCORE_MOD:
        qk_scale = 1.0
    else:
        qk_scale = scale_log2
    tile_n = tl.arange(0, BLOCK_N)
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tile_n  # key positions within stream p
        n64 = tl.cast(n_start, tl.int64)  # (64-bit: a long stream's rows x stride > 2^31)
        if USE_TMA:
            k = k_desc.load([n_start, 0])
        else:
            k_ok = offs_e[None, :] < E
            if MASKED:
                k_ok = k_ok & (offs_n[:, None] < kv_end)
            k = tl.load(k_ptrs + n64 * stride_kt + tile_n[:, None] * stride_kt, mask=k_ok,
                        other=0.0)
        qk = mma(q, tl.trans(k), F.F32_DOT)
        # (the helpers are called only when they have work: each call of a jit function costs
        # the interpreter a millisecond, nothing compiled)
        if SCORE_MOD:
            qk = log2_scores(qk, scale_log2, softcap_scale, F.SOFTCAP, SCORE_MOD)
        if MASKED or F.HAS_ALIBI or F.MASK_KIND != 0:
            if MASK_TMA:  # the attn_mask tile through its descriptor (zeros past its edges)
                mask_src = mask_rows.load([mask_row0, kv_start + n_start])
            else:
                mask_src = mask_rows + (kv_start + n64) * stride_mk + tile_n[None, :] * stride_mk
            qk = mask_scores(qk, qi, offs_n[None, :], self_pair, off, left, right, kv_end,
                             alibi2, mask_src, row_ok[:, None] & (offs_n[None, :] < kv_end),
                             MASKED, F.BAND, F.HAS_ALIBI, F.MASK_KIND, MASK_TMA)
        # a row with nothing attended yet keeps max -inf: shift it by 0 (exp2(-inf) = 0)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        probs = tl.exp2(qk * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        if F.HAS_DROPOUT:  # the normaliser sees every weight, the values only the kept ones
            keep = dropout_keep(seed, rng_offset, bh, q_rows, kv_start + n_start, Tq, Tk,
                                dropout_p, BLOCK_M, BLOCK_N)
            probs = tl.where(keep, probs, 0.0)
        if USE_TMA:
            v = v_desc.load([n_start, 0])
        else:
            v_ok = offs_ev[None, :] < EV
            if MASKED:
                v_ok = v_ok & (offs_n[:, None] < kv_end)
            v = tl.load(v_ptrs + n64 * stride_vt + tile_n[:, None] * stride_vt, mask=v_ok,
                        other=0.0)
        acc = acc * alpha[:, None] + mma(to_io(probs, v.dtype, F.BF16_RTNE), v, F.F32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _peer_stages(acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, m_start, q_len, offs_m,
                 row_ok, q_rows, bh, pair, mask_rows, mask_row0, row_strides, rng, scales, sizes,
                 F: tl.constexpr, USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr,
                 E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """One peer's key tiles in three stages: boundary, full (mask-free), boundary
    (tiles.key_stages gives their bounds)."""
    kv_start, kv_end, self_pair, off, left, right, alibi2 = pair
    bounds = key_stages(m_start, q_len, kv_end, self_pair, off, left, right, F.BAND, BLOCK_M,
                        BLOCK_N)
    for stage in tl.static_range(3):  # unrolled: each stage its own loop (MASKED: 0 and 2)
        acc, m_i, l_i = _peer_tiles(
            acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, bounds[stage], bounds[stage + 1],
            offs_m[:, None], row_ok, q_rows, bh, pair, mask_rows, mask_row0, row_strides, rng,
            scales, sizes, F, stage != 1, USE_TMA, MASK_TMA, E_PAD, EV_PAD, BLOCK_M, BLOCK_N)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, tables, optional, rng, scales,
    q_strides, k_strides, v_strides, o_strides, lse_strides, opt_strides, sizes, TUNE_LEN,
    F: tl.constexpr, ONE_ACC: tl.constexpr, USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The arguments' bundles: see launch.py (F: launch.Flags)."""
    QOff, KVOff, TileOff, PeerStart, PeerList = tables
    Gate, Bias, KVLen, Mask, Alibi, Sinks = optional
    stride_qb, stride_qh, stride_qt, stride_qe = q_strides
    stride_kb, stride_kh, stride_kt, stride_ke = k_strides
    stride_vb, stride_vh, stride_vt, stride_ve = v_strides
    stride_ob, stride_oh, stride_ot, stride_oe = o_strides
    stride_lb, stride_lh, stride_ls = lse_strides
    gate_strides, bias_strides, kvlen_strides, mask_strides, alibi_strides = opt_strides
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge = gate_strides
    stride_bb, stride_bs, stride_bp, stride_bh = bias_strides
    stride_klb, stride_kls = kvlen_strides
    stride_mb, stride_mh, stride_mq, stride_mk = mask_strides
    stride_ab, stride_ah = alibi_strides
    num_q_heads, group_size, num_streams, steps, Tq, Tk, E, EV, left, right = sizes
    dropout_p = rng[2]
    bh = tl.program_id(1)
    b, h, kvh, s, q_start, q_len, m_start = row_tile(
        QOff, TileOff + (BLOCK_M // 16 - 1) * (num_streams + 1), num_q_heads, group_size,
        num_streams, steps, BLOCK_M)

    offs_m = m_start + tl.arange(0, BLOCK_M)  # row positions within stream s
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    row_ok = offs_m < q_len
    q_rows = q_start + offs_m
    # 64-bit offsets to the tile's first row (rows x row stride passes 2^31 in flash-attn layouts,
    # L*H*E, and materialised masks, Tq*Tk); the tile's own rows from there stay 32-bit
    row0 = (q_start + m_start).to(tl.int64)
    tile_m = tl.arange(0, BLOCK_M)
    stats = Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_head = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    k_head = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    if USE_TMA:  # per (batch, head, stream): rows past the stream's end read as zeros
        q_desc = tl.make_tensor_descriptor(q_head + q_start.to(tl.int64) * stride_qt,
                                           shape=[q_len, E],
                                           strides=[stride_qt, 1], block_shape=[BLOCK_M, E_PAD])
        q = q_desc.load([m_start, 0])
    else:
        q = tl.load(q_head + row0 * stride_qt + tile_m[:, None] * stride_qt
                    + offs_e[None, :] * stride_qe,
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    mask_row0 = q_start + m_start
    if MASK_TMA:  # the (Tq, Tk) mask plane of (b, h) as a descriptor: no pointer tile
        mask_rows = tl.make_tensor_descriptor(
            Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh, shape=[Tq, Tk],
            strides=[stride_mq, 1], block_shape=[BLOCK_M, BLOCK_N])
    else:
        mask_rows = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
            + row0 * stride_mq + tile_m[:, None] * stride_mq
    alibi2 = 0.0
    if F.HAS_ALIBI:
        alibi2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32) * LOG2E

    # The output state (max, sum, unnormalised values) in log2 units; a sink is a value-less
    # score every row starts with. ONE_ACC: the peers' partials share this state (no gate, or
    # one peer whose gate scales the end result): each peer's bias is a shift of the state's
    # max when the peer starts. Otherwise each peer runs in its own (acc, m_p, l_p) and merges
    # at its end: "joint" by log-sum-exp with its gate, "peer" as its gated normalised sum.
    m_o = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_o = tl.zeros([BLOCK_M], tl.float32)
    if F.HAS_SINKS:
        m_o = tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + h).to(tl.float32) * LOG2E
        l_o = l_o + 1.0
    out = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
    gate = tl.full([EV_PAD], 1.0, tl.float32)
    bias_prev = 0.0
    row_strides = (stride_kt, stride_vt, stride_mk)

    peer_lo, peer_hi = attended_peers(PeerStart, s, F.DIAGONAL)
    for i in range(peer_lo, peer_hi):
        p = attended_peer(PeerList, i, s, F.DIAGONAL)
        kv_start, kv_len, kv_end = kv_extent(KVOff, KVLen, stride_klb, stride_kls, b, p,
                                             F.HAS_KVLEN)
        self_pair = p == s
        off = 0
        if F.BOTTOM_RIGHT:  # the diagonal ends at the last key: off = M_s - L_s
            off = kv_len - q_len
        bias2 = 0.0
        if F.HAS_BIAS:
            bias2 = tl.load(Bias + b * stride_bb + s * stride_bs + p * stride_bp
                            + h * stride_bh).to(tl.float32) * LOG2E
        if F.HAS_GATE:
            gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp + h * stride_gh
                           + offs_ev * stride_ge, mask=offs_ev < EV, other=0.0).to(tl.float32)
        k_desc = k_head
        v_desc = v_head
        if USE_TMA:
            k_desc = tl.make_tensor_descriptor(k_head + kv_start.to(tl.int64) * stride_kt,
                                               shape=[kv_len, E],
                                               strides=[stride_kt, 1],
                                               block_shape=[BLOCK_N, E_PAD])
            v_desc = tl.make_tensor_descriptor(v_head + kv_start.to(tl.int64) * stride_vt,
                                               shape=[kv_len, EV],
                                               strides=[stride_vt, 1],
                                               block_shape=[BLOCK_N, EV_PAD])
        k_ptrs = k_head + kv_start.to(tl.int64) * stride_kt + offs_e[None, :] * stride_ke
        v_ptrs = v_head + kv_start.to(tl.int64) * stride_vt + offs_ev[None, :] * stride_ve
        pair = (kv_start, kv_end, self_pair, off, left, right, alibi2)
        if ONE_ACC:
            m_o = m_o - (bias2 - bias_prev)  # the state in units of this peer's unbiased scores
            bias_prev = bias2
            out, m_o, l_o = _peer_stages(
                out, m_o, l_o, q, k_desc, v_desc, k_ptrs, v_ptrs, m_start, q_len, offs_m,
                row_ok, q_rows, bh, pair, mask_rows, mask_row0, row_strides, rng, scales,
                sizes, F, USE_TMA, MASK_TMA, E_PAD, EV_PAD, BLOCK_M, BLOCK_N)
            if F.PEER_MODE:  # (one peer)
                tl.store(stats + p * stride_ls + q_rows,
                         (m_o + bias2 + tl.log2(l_o)) * LN2, mask=row_ok)
        else:
            acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
            m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_p = tl.zeros([BLOCK_M], tl.float32)
            acc, m_p, l_p = _peer_stages(
                acc, m_p, l_p, q, k_desc, v_desc, k_ptrs, v_ptrs, m_start, q_len, offs_m,
                row_ok, q_rows, bh, pair, mask_rows, mask_row0, row_strides, rng, scales,
                sizes, F, USE_TMA, MASK_TMA, E_PAD, EV_PAD, BLOCK_M, BLOCK_N)
            # the peer's partial result merges once: its bias shifts its max, its gate scales it
            m_p += bias2
            if F.PEER_MODE:
                inv = tl.where(l_p > 0, 1.0 / tl.where(l_p > 0, l_p, 1.0), 0.0)
                out += acc * (inv[:, None] * gate[None, :])
                tl.store(stats + p * stride_ls + q_rows,
                         (m_p + tl.log2(l_p)) * LN2, mask=row_ok)
            else:
                m_new = tl.maximum(m_o, m_p)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_o - m_safe)
                beta = tl.exp2(m_p - m_safe)
                l_o = l_o * alpha + l_p * beta
                out = out * alpha[:, None] + acc * (beta[:, None] * gate[None, :])
                m_o = m_new

    if ONE_ACC:
        m_o += bias_prev
        inv = tl.where(l_o > 0, 1.0 / tl.where(l_o > 0, l_o, 1.0), 0.0)  # empty rows give 0
        out = out * (inv[:, None] * gate[None, :])
    elif not F.PEER_MODE:
        inv = tl.where(l_o > 0, 1.0 / tl.where(l_o > 0, l_o, 1.0), 0.0)
        out = out * inv[:, None]
    if F.HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    if not F.PEER_MODE:
        tl.store(stats + q_rows, (m_o + tl.log2(l_o)) * LN2, mask=row_ok)
    out = to_io(out, Out.dtype.element_ty, F.BF16_RTNE)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(o_head + q_start.to(tl.int64) * stride_ot,
                                           shape=[q_len, EV],
                                           strides=[stride_ot, 1], block_shape=[BLOCK_M, EV_PAD])
        o_desc.store([m_start, 0], out)
    else:
        tl.store(o_head + row0 * stride_ot + tile_m[:, None] * stride_ot
                 + offs_ev[None, :] * stride_oe, out,
                 mask=row_ok[:, None] & (offs_ev[None, :] < EV))


# the forward kernel (the compile ledger hashes it after the backward ones: ledger.py)
KERNELS = (_attn_fwd,)
_attn_fwd_tuned = tuned(_attn_fwd)


def forward_launch(problem, out, lse):
    """(kernel, args, kwargs, grid) of the forward launch, assembled from launch.py's bundles:
    shared by forward() and the compile report (compile_check)."""
    q = problem.q
    batch, num_q_heads = q.shape[:2]
    tables = stream_tables(problem, q.device)
    common = common_args(problem, (tables["q_off"], tables["kv_off"], tables["q_tiles"],
                                   tables["peer_start"], tables["peer_list"]), lse)
    args = (q, problem.k, problem.v, out, lse, common.tables, common.optional, common.rng,
            common.scales, common.q_strides, common.k_strides, common.v_strides,
            tuple(out.stride()), common.lse_strides, common.opt_strides, common.sizes,
            tune_len_of(problem))
    tma = use_tma(problem, out)
    kwargs = dict(F=kernel_flags(problem), ONE_ACC=one_accumulator(problem), USE_TMA=tma,
                  MASK_TMA=tma and mask_tma_ok(mask_for_kernel(problem.attn_mask)),
                  **head_dims(problem), **meta())

    def grid(META):
        return (num_tiles(problem.q_lens, META["BLOCK_M"]), batch * num_q_heads)

    return _attn_fwd, args, kwargs, grid


def forward(problem):
    q = problem.q
    batch, num_q_heads, q_total, _ = q.shape
    peer_mode = problem.normalize == "peer"
    out = torch.zeros(batch, num_q_heads, q_total, problem.value_dim, dtype=q.dtype,
                      device=q.device)
    shape = ((batch, num_q_heads, problem.num_streams, q_total) if peer_mode
             else (batch, num_q_heads, q_total))
    lse = torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)
    if q_total == 0 or batch * num_q_heads == 0:
        return out, lse
    with launch_device(q):
        _, args, kwargs, grid = forward_launch(problem, out, lse)
        _attn_fwd_tuned[grid](*args, **kwargs)
    return out, lse
