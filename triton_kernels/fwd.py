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

import functools

import torch
import triton
import triton.language as tl

from .configs import interpreter_meta, tune_len, tuned
from .tiles import (LN2, LOG2E, attended_peer, attended_peers, dropout_keep, kv_extent,
                    key_stages, log2_scores, mask_scores, mma, row_tile, to_io)
from .utils import (INTERPRET, band, dropout_args, f32_precision, launch_device, mask_for_kernel,
                    mask_kind, num_tiles, padded_dim, search_steps, stream_tables,
                    strides_or_zero, tma_ok)


@triton.jit
def _peer_tiles(acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kt, stride_vt,
                n_lo, n_hi, qi, kv_start, kv_end, self_pair, off, left, right, alibi2,
                scale_log2, softcap_scale, mask_rows, mask_row0, stride_mk, row_ok, E, EV,
                seed, rng_offset, dropout_p, bh, q_rows, Tq, Tk,
                MASKED: tl.constexpr, BAND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, SCORE_MOD: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr,
                F32_DOT: tl.constexpr,
                BF16_RTNE: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax over key tiles [n_lo, n_hi) of one peer (MASKED: boundary tiles)."""
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
        qk = mma(q, tl.trans(k), F32_DOT)
        # (the helpers are called only when they have work: each call of a jit function costs
        # the interpreter a millisecond, nothing compiled)
        if SCORE_MOD:
            qk = log2_scores(qk, scale_log2, softcap_scale, SOFTCAP, SCORE_MOD)
        if MASKED or HAS_ALIBI or MASK_KIND != 0:
            if MASK_TMA:  # the attn_mask tile through its descriptor (zeros past its edges)
                mask_src = mask_rows.load([mask_row0, kv_start + n_start])
            else:
                mask_src = mask_rows + (kv_start + n64) * stride_mk + tile_n[None, :] * stride_mk
            qk = mask_scores(qk, qi, offs_n[None, :], self_pair, off, left, right, kv_end,
                             alibi2, mask_src, row_ok[:, None] & (offs_n[None, :] < kv_end),
                             MASKED, BAND, HAS_ALIBI, MASK_KIND, MASK_TMA)
        # a row with nothing attended yet keeps max -inf: shift it by 0 (exp2(-inf) = 0)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        probs = tl.exp2(qk * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        if HAS_DROPOUT:  # the normaliser sees every weight, the values only the kept ones
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
        acc = acc * alpha[:, None] + mma(to_io(probs, v.dtype, BF16_RTNE), v, F32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _peer_stages(acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kt, stride_vt, m_start,
                 q_len, offs_m, kv_start, kv_end, self_pair, off, left, right, alibi2,
                 scale_log2, softcap_scale, mask_rows, mask_row0, stride_mk, row_ok, E, EV,
                 seed, rng_offset, dropout_p, bh, q_rows, Tq, Tk,
                 BAND: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
                 SOFTCAP: tl.constexpr, SCORE_MOD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr, F32_DOT: tl.constexpr,
                 BF16_RTNE: tl.constexpr,
                 E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """One peer's key tiles: boundary, full (mask-free), boundary (see tiles.key_stages)."""
    n0, n_a, n_b, n_hi = key_stages(m_start, q_len, kv_end, self_pair, off, left, right,
                                    BAND, BLOCK_M, BLOCK_N)
    qi = offs_m[:, None]
    acc, m_i, l_i = _peer_tiles(
        acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kt, stride_vt, n0, n_a, qi,
        kv_start, kv_end, self_pair, off, left, right, alibi2, scale_log2, softcap_scale,
        mask_rows, mask_row0, stride_mk, row_ok, E, EV, seed, rng_offset, dropout_p, bh, q_rows,
        Tq, Tk, True, BAND, HAS_ALIBI, MASK_KIND, SOFTCAP, SCORE_MOD, HAS_DROPOUT, USE_TMA,
        MASK_TMA, F32_DOT, BF16_RTNE, E_PAD, EV_PAD, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _peer_tiles(
        acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kt, stride_vt, n_a, n_b, qi,
        kv_start, kv_end, self_pair, off, left, right, alibi2, scale_log2, softcap_scale,
        mask_rows, mask_row0, stride_mk, row_ok, E, EV, seed, rng_offset, dropout_p, bh, q_rows,
        Tq, Tk, False, BAND, HAS_ALIBI, MASK_KIND, SOFTCAP, SCORE_MOD, HAS_DROPOUT, USE_TMA,
        MASK_TMA, F32_DOT, BF16_RTNE, E_PAD, EV_PAD, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _peer_tiles(
        acc, m_i, l_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kt, stride_vt, n_b, n_hi, qi,
        kv_start, kv_end, self_pair, off, left, right, alibi2, scale_log2, softcap_scale,
        mask_rows, mask_row0, stride_mk, row_ok, E, EV, seed, rng_offset, dropout_p, bh, q_rows,
        Tq, Tk, True, BAND, HAS_ALIBI, MASK_KIND, SOFTCAP, SCORE_MOD, HAS_DROPOUT, USE_TMA,
        MASK_TMA, F32_DOT, BF16_RTNE, E_PAD, EV_PAD, BLOCK_M, BLOCK_N)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, QOff, KVOff, TileOff, PeerStart, PeerList, Gate, Bias, KVLen, Mask,
    Alibi, Sinks,
    seed, rng_offset, dropout_p, scale_log2, softcap_scale,
    stride_qb, stride_qh, stride_qt, stride_qe,
    stride_kb, stride_kh, stride_kt, stride_ke,
    stride_vb, stride_vh, stride_vt, stride_ve,
    stride_ob, stride_oh, stride_ot, stride_oe,
    stride_lb, stride_lh, stride_ls,
    stride_gb, stride_gs, stride_gp, stride_gh, stride_ge,
    stride_bb, stride_bs, stride_bp, stride_bh,
    stride_klb, stride_kls,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ab, stride_ah,
    num_q_heads, group_size, num_streams, steps, Tq, Tk, E, EV, left, right, TUNE_LEN,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KVLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, BAND: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
    DIAGONAL: tl.constexpr, ONE_ACC: tl.constexpr, PEER_MODE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr,
    F32_DOT: tl.constexpr, BF16_RTNE: tl.constexpr,
    E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    SCORE_MOD: tl.constexpr = SOFTCAP or HAS_ALIBI or MASK_KIND == 2
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
    if HAS_ALIBI:
        alibi2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32) * LOG2E

    # The output state (max, sum, unnormalised values) in log2 units; a sink is a value-less
    # score every row starts with. ONE_ACC: the peers' partials share this state (no gate, or
    # one peer whose gate scales the end result): each peer's bias is a shift of the state's
    # max when the peer starts. Otherwise each peer runs in its own (acc, m_p, l_p) and merges
    # at its end: "joint" by log-sum-exp with its gate, "peer" as its gated normalised sum.
    m_o = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_o = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:
        m_o = tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + h).to(tl.float32) * LOG2E
        l_o = l_o + 1.0
    out = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
    gate = tl.full([EV_PAD], 1.0, tl.float32)
    bias_prev = 0.0

    peer_lo, peer_hi = attended_peers(PeerStart, s, DIAGONAL)
    for i in range(peer_lo, peer_hi):
        p = attended_peer(PeerList, i, s, DIAGONAL)
        kv_start, kv_len, kv_end = kv_extent(KVOff, KVLen, stride_klb, stride_kls, b, p,
                                             HAS_KVLEN)
        self_pair = p == s
        off = 0
        if BOTTOM_RIGHT:  # the diagonal ends at the last key: off = M_s - L_s
            off = kv_len - q_len
        bias2 = 0.0
        if HAS_BIAS:
            bias2 = tl.load(Bias + b * stride_bb + s * stride_bs + p * stride_bp
                            + h * stride_bh).to(tl.float32) * LOG2E
        if HAS_GATE:
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
        if ONE_ACC:
            m_o = m_o - (bias2 - bias_prev)  # the state in units of this peer's unbiased scores
            bias_prev = bias2
            out, m_o, l_o = _peer_stages(
                out, m_o, l_o, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kt, stride_vt, m_start,
                q_len, offs_m, kv_start, kv_end, self_pair, off, left, right, alibi2, scale_log2,
                softcap_scale, mask_rows, mask_row0, stride_mk, row_ok, E, EV, seed, rng_offset,
                dropout_p, bh, q_rows, Tq, Tk, BAND, HAS_ALIBI, MASK_KIND, SOFTCAP, SCORE_MOD,
                HAS_DROPOUT, USE_TMA, MASK_TMA, F32_DOT, BF16_RTNE, E_PAD, EV_PAD, BLOCK_M,
                BLOCK_N)
            if PEER_MODE:  # (one peer)
                tl.store(stats + p * stride_ls + q_rows,
                         (m_o + bias2 + tl.log2(l_o)) * LN2, mask=row_ok)
        else:
            acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
            m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_p = tl.zeros([BLOCK_M], tl.float32)
            acc, m_p, l_p = _peer_stages(
                acc, m_p, l_p, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kt, stride_vt, m_start,
                q_len, offs_m, kv_start, kv_end, self_pair, off, left, right, alibi2, scale_log2,
                softcap_scale, mask_rows, mask_row0, stride_mk, row_ok, E, EV, seed, rng_offset,
                dropout_p, bh, q_rows, Tq, Tk, BAND, HAS_ALIBI, MASK_KIND, SOFTCAP, SCORE_MOD,
                HAS_DROPOUT, USE_TMA, MASK_TMA, F32_DOT, BF16_RTNE, E_PAD, EV_PAD, BLOCK_M,
                BLOCK_N)
            # the peer's partial result merges once: its bias shifts its max, its gate scales it
            m_p += bias2
            if PEER_MODE:
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
    elif not PEER_MODE:
        inv = tl.where(l_o > 0, 1.0 / tl.where(l_o > 0, l_o, 1.0), 0.0)
        out = out * inv[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    if not PEER_MODE:
        tl.store(stats + q_rows, (m_o + tl.log2(l_o)) * LN2, mask=row_ok)
    out = to_io(out, Out.dtype.element_ty, BF16_RTNE)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(o_head + q_start.to(tl.int64) * stride_ot,
                                           shape=[q_len, EV],
                                           strides=[stride_ot, 1], block_shape=[BLOCK_M, EV_PAD])
        o_desc.store([m_start, 0], out)
    else:
        tl.store(o_head + row0 * stride_ot + tile_m[:, None] * stride_ot
                 + offs_ev[None, :] * stride_oe, out,
                 mask=row_ok[:, None] & (offs_ev[None, :] < EV))


_attn_fwd_tuned = tuned(_attn_fwd)


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _device_allocator(size: int, alignment: int, stream):
    """Global scratch for on-device tensor descriptors (triton.set_allocator), called during a
    launch: on the current device, which the launch guard (utils.launch_device) makes the
    inputs'."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def use_tma(problem, out) -> bool:
    q = problem.q
    if not tma_ok(q, problem.k, problem.v, out):
        return False
    if INTERPRET:
        return True
    if q.device.type != "cuda" or not _has_tma(q.device.index or 0):
        return False
    triton.set_allocator(_device_allocator)
    return True


def one_accumulator(problem) -> bool:
    """Whether the forward's peers can share one accumulator: at most one attended peer per
    stream (SDPA, varlen), or "joint" without gates (a peer's bias is a shift of the max)."""
    single = problem.num_streams == 1 or problem.diagonal_peers
    return single or (problem.normalize != "peer" and problem.gate is None)


def mask_tma_ok(mask) -> bool:
    """The attn_mask through a descriptor: keys contiguous, rows 16-byte aligned and not
    broadcast (a stride-0 query dim is read through pointers)."""
    if mask is None:
        return False
    size = mask.element_size()
    return (mask.stride(-1) == 1 and mask.stride(-2) > 0 and mask.data_ptr() % 16 == 0
            and all((st * size) % 16 == 0 for st in mask.stride()[:-1]))


def kernel_flags(problem):
    """The compile-time feature flags shared by forward and backward launches."""
    q = problem.q
    left, right = band(problem)
    return dict(
        HAS_GATE=problem.gate is not None,
        HAS_BIAS=problem.bias is not None,
        HAS_KVLEN=problem.kv_lengths is not None,
        MASK_KIND=mask_kind(problem.attn_mask),
        BAND=left >= 0 or right >= 0,
        BOTTOM_RIGHT=bool(problem.bottom_right),
        SOFTCAP=problem.softcap > 0,
        HAS_ALIBI=problem.alibi_slopes is not None,
        HAS_SINKS=problem.sinks is not None,
        DIAGONAL=problem.diagonal_peers,
        ONE_ACC=one_accumulator(problem),
        PEER_MODE=problem.normalize == "peer",
        HAS_DROPOUT=problem.dropout_p > 0,
        F32_DOT=f32_precision(q.dtype, padded_dim(problem.head_dim),
                              padded_dim(problem.value_dim)),
        BF16_RTNE=INTERPRET and q.dtype == torch.bfloat16,
        E_PAD=padded_dim(problem.head_dim),
        EV_PAD=padded_dim(problem.value_dim),
    )


def scale_args(problem):
    """(scale_log2, softcap_scale): with softcap z = c * tanh(scale * q.k / c), so the log2
    multiplier is c * log2(e) and tanh's argument is q.k * scale / c."""
    if problem.softcap > 0:
        return problem.softcap * 1.4426950408889634, problem.scale / problem.softcap
    return problem.scale * 1.4426950408889634, 0.0


def shared_args(problem, tables):
    """Pointer and stride arguments of the optional inputs, in the kernels' order:
    (gate, bias, kv_lengths, mask, alibi, sinks) and their strides. Absent inputs pass a table
    with zero strides; their flags keep them unread."""
    mask = mask_for_kernel(problem.attn_mask)
    dummy = tables["q_off"]
    alibi = problem.alibi_slopes
    tensors = tuple(t if t is not None else dummy for t in (
        problem.gate, problem.bias, problem.kv_lengths, mask, alibi, problem.sinks))
    strides = (strides_or_zero(problem.gate, 5) + strides_or_zero(problem.bias, 4)
               + strides_or_zero(problem.kv_lengths, 2) + strides_or_zero(mask, 4)
               + strides_or_zero(alibi, 2))
    return tensors, strides


def forward_launch(problem, out, lse):
    """(kernel, args, kwargs, grid) of the forward launch: the one place the arguments are
    assembled, shared by forward() and the compile report (compile_check)."""
    q, k, v = problem.q, problem.k, problem.v
    batch, num_q_heads, q_total, _ = q.shape
    num_streams = problem.num_streams
    peer_mode = problem.normalize == "peer"
    tables = stream_tables(problem, q.device)
    (gate, bias, kv_lengths, mask, alibi, sinks), strides = shared_args(problem, tables)
    seed, rng_offset, dropout_p = dropout_args(problem)
    lse_strides = (lse.stride(0), lse.stride(1), lse.stride(2) if peer_mode else 0)
    left, right = band(problem)
    args = (q, k, v, out, lse, tables["q_off"], tables["kv_off"], tables["q_tiles"],
            tables["peer_start"], tables["peer_list"], gate, bias, kv_lengths, mask, alibi, sinks,
            seed, rng_offset, dropout_p, *scale_args(problem),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides, *strides,
            num_q_heads, num_q_heads // problem.num_kv_heads, num_streams,
            search_steps(num_streams), q_total, k.shape[2], problem.head_dim, problem.value_dim,
            left, right, tune_len(max(max(problem.q_lens), max(problem.kv_lens))))
    tma = use_tma(problem, out)
    mask_tma = tma and mask_tma_ok(mask_for_kernel(problem.attn_mask))
    kwargs = dict(kernel_flags(problem), USE_TMA=tma, MASK_TMA=mask_tma,
                  **(interpreter_meta() if INTERPRET else {}))

    def grid(META):
        return (num_tiles(problem.q_lens, META["BLOCK_M"]), batch * num_q_heads)

    return _attn_fwd, args, kwargs, grid


def num_row_tiles(problem, block_m: int) -> int:
    """Query tiles of the longest stream (the per-tile partial buffers of the backward)."""
    return triton.cdiv(max(problem.q_lens), block_m) if problem.q_lens else 0


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
