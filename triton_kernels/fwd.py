"""Forward kernel: a program per (query tile, batch*head, stream s).

For each peer p that stream s attends to, the program walks p's key/value tiles with an online
softmax (fp32 running max/sum, exp2, fp32 accumulator). "joint" keeps one running state across
all peers; "peer" keeps one per peer and folds it into the output, gated, when the peer ends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import interpreter_meta, tune_len, tuned
from .tiles import LN2, LOG2E, dropout_keep, key_bounds, masked_scores, mma, row_tile, to_io
from .utils import (INTERPRET, dropout_args, mask_for_kernel, mask_kind, padded_dim,
                    stream_tables, strides_or_zero, use_f32_dot)


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, QOff, KVOff, Peers, Gate, Bias, KVLen, Mask,
    seed, rng_offset, dropout_p, scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qe,
    stride_kb, stride_kh, stride_kt, stride_ke,
    stride_vb, stride_vh, stride_vt, stride_ve,
    stride_ob, stride_oh, stride_ot, stride_oe,
    stride_lb, stride_lh, stride_ls,
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
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h, kvh, s, q_start, q_len, m_start = row_tile(QOff, num_q_heads, group_size, BLOCK_M)
    if m_start >= q_len:  # the grid covers the longest stream
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)  # row positions within stream s
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    row_ok = offs_m < q_len
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + (q_start + offs_m)[:, None] * stride_qt + offs_e[None, :] * stride_qe)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    k_head = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    mask_rows = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
        + (q_start + offs_m)[:, None] * stride_mq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
    out = tl.zeros([BLOCK_M, EV_PAD], tl.float32)  # "peer": the gated sum of finished peers

    for p in range(0, num_streams):
        if tl.load(Peers + s * num_streams + p) != 0:  # pairs not attended cost nothing
            kv_start, kv_end = key_bounds(KVOff, KVLen, stride_klb, stride_kls, b, p, s, m_start,
                                          HAS_KVLEN, IS_CAUSAL, BLOCK_M)
            bias_log2 = 0.0
            if HAS_BIAS:
                bias_log2 = tl.load(Bias + b * stride_bb + s * stride_bs + p * stride_bp
                                    + h * stride_bh).to(tl.float32) * LOG2E
            gate = tl.full([EV_PAD], 1.0, tl.float32)
            if HAS_GATE:
                gate = tl.load(Gate + b * stride_gb + s * stride_gs + p * stride_gp + h * stride_gh
                               + offs_ev * stride_ge, mask=offs_ev < EV, other=0.0).to(tl.float32)
            if PEER_MODE:  # a fresh softmax per peer
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)

            for n_start in range(0, kv_end, BLOCK_N):
                offs_n = n_start + tl.arange(0, BLOCK_N)  # key positions within stream p
                key_ok = offs_n < kv_end
                kT = tl.load(k_head + (kv_start + offs_n)[None, :] * stride_kt
                             + offs_e[:, None] * stride_ke,
                             mask=key_ok[None, :] & (offs_e[:, None] < E), other=0.0)
                qk = mma(q, kT, F32_DOT) * scale_log2
                qk = masked_scores(qk, offs_m, offs_n, m_start, n_start, kv_end, p == s, bias_log2,
                                   mask_rows + (kv_start + offs_n)[None, :] * stride_mk,
                                   row_ok[:, None] & key_ok[None, :],
                                   HAS_BIAS, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
                # online softmax; a row with nothing attended yet keeps max -inf: shift by 0
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                probs = tl.exp2(qk - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(probs, 1)
                if HAS_DROPOUT:  # the normaliser sees every weight, the values only the kept ones
                    keep = dropout_keep(seed, rng_offset, bh, q_start + offs_m, kv_start + offs_n,
                                        Tq, Tk, dropout_p)
                    probs = tl.where(keep, probs, 0.0)
                v = tl.load(v_head + (kv_start + offs_n)[:, None] * stride_vt
                            + offs_ev[None, :] * stride_ve,
                            mask=key_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
                pv = mma(to_io(probs, v.dtype, BF16_RTNE), v, F32_DOT)
                if HAS_GATE:
                    if not PEER_MODE:  # joint: the gate of this peer weighs its share of P.V
                        pv = pv * gate[None, :]
                acc = acc * alpha[:, None] + pv
                m_i = m_new

            if PEER_MODE:  # fold the finished peer in, gated, and save its log-sum-exp
                inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
                out += acc * inv[:, None] * gate[None, :]
                lse_p = (m_i + tl.log2(l_i)) * LN2
                tl.store(Lse + b * stride_lb + h * stride_lh + p * stride_ls + q_start + offs_m,
                         lse_p, mask=row_ok)

    if not PEER_MODE:
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # empty rows give 0, never NaN
        if HAS_DROPOUT:
            inv = inv / (1.0 - dropout_p)
        out = acc * inv[:, None]
        tl.store(Lse + b * stride_lb + h * stride_lh + q_start + offs_m,
                 (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + (q_start + offs_m)[:, None] * stride_ot + offs_ev[None, :] * stride_oe)
    tl.store(o_ptrs, to_io(out, Out.dtype.element_ty, BF16_RTNE), mask=row_ok[:, None] & (offs_ev[None, :] < EV))


_attn_fwd_tuned = tuned(_attn_fwd)


def kernel_flags(problem):
    """The compile-time feature flags shared by forward and backward launches."""
    q = problem.q
    return dict(
        HAS_GATE=problem.gate is not None,
        HAS_BIAS=problem.bias is not None,
        HAS_KVLEN=problem.kv_lengths is not None,
        MASK_KIND=mask_kind(problem.attn_mask),
        IS_CAUSAL=bool(problem.is_causal),
        PEER_MODE=problem.normalize == "peer",
        HAS_DROPOUT=problem.dropout_p > 0,
        F32_DOT=use_f32_dot(q.dtype),
        BF16_RTNE=INTERPRET and q.dtype == torch.bfloat16,
        E_PAD=padded_dim(problem.head_dim),
        EV_PAD=padded_dim(problem.value_dim),
    )


def shared_args(problem):
    """Pointer and stride arguments of the problem inputs, in the kernels' order:
    (tables..., gate, bias, kv_lengths, mask) and their strides. Absent inputs pass q with
    zero strides; their flags keep them unread."""
    q = problem.q
    q_off, kv_off, peers = stream_tables(problem, q.device)
    mask = mask_for_kernel(problem.attn_mask)
    tensors = (q_off, kv_off, peers,
               problem.gate if problem.gate is not None else q,
               problem.bias if problem.bias is not None else q,
               problem.kv_lengths if problem.kv_lengths is not None else q_off,
               mask if mask is not None else q)
    strides = (strides_or_zero(problem.gate, 5) + strides_or_zero(problem.bias, 4)
               + strides_or_zero(problem.kv_lengths, 2) + strides_or_zero(mask, 4))
    return tensors, strides


def num_row_tiles(problem, block_m: int) -> int:
    return triton.cdiv(max(problem.q_lens), block_m) if problem.q_lens else 0


def forward_launch(problem, out, lse):
    """(kernel, args, kwargs, grid) of the forward launch: the one place the arguments are
    assembled, shared by forward() and the compile report (compile_check)."""
    q, k, v = problem.q, problem.k, problem.v
    batch, num_q_heads, q_total, _ = q.shape
    num_streams = problem.num_streams
    peer_mode = problem.normalize == "peer"
    tensors, strides = shared_args(problem)
    seed, rng_offset, dropout_p = dropout_args(problem)
    lse_strides = (lse.stride(0), lse.stride(1), lse.stride(2) if peer_mode else 0)
    args = (q, k, v, out, lse, *tensors,
            seed, rng_offset, dropout_p, problem.scale * 1.4426950408889634,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides, *strides,
            num_q_heads, num_q_heads // problem.num_kv_heads, num_streams, q_total, k.shape[2],
            problem.head_dim, problem.value_dim,
            tune_len(max(max(problem.q_lens), max(problem.kv_lens))))
    kwargs = dict(kernel_flags(problem), **(interpreter_meta() if INTERPRET else {}))

    def grid(META):
        return (num_row_tiles(problem, META["BLOCK_M"]), batch * num_q_heads, num_streams)

    return _attn_fwd, args, kwargs, grid


def forward(problem):
    q = problem.q
    batch, num_q_heads, q_total, _ = q.shape
    peer_mode = problem.normalize == "peer"
    out = torch.zeros(batch, num_q_heads, q_total, problem.value_dim, dtype=q.dtype, device=q.device)
    lse_shape = (batch, num_q_heads, problem.num_streams, q_total) if peer_mode else (batch, num_q_heads, q_total)
    lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if q_total == 0 or batch * num_q_heads == 0:
        return out, lse
    _, args, kwargs, grid = forward_launch(problem, out, lse)
    _attn_fwd_tuned[grid](*args, **kwargs)
    return out, lse
