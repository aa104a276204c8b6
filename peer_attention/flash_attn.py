"""flash-attn 2 compatible entry points (SPEC section 9): flash_attn_func, flash_attn_varlen_func.

    from peer_attention import flash_attn_func, flash_attn_varlen_func

The flash-attn layouts become the normalised problem as strided views (no copy of q, k or v):
(B, L, Hq, E) is viewed as (B, Hq, L, E); a packed varlen batch (total, H, E) is viewed as one
batch entry (1, H, total, E) whose sequences are streams with the diagonal peer table (each
sequence attends only to itself). Causal masks, windows and ALiBi are aligned bottom-right, as in
flash-attn: query i may see key j iff i + S - L - left <= j <= i + S - L + right.

Whichever backend serves the problem (auto: the fastest that declares the variant, else the
reference) gives the same numbers; `backend=` picks one explicitly.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor

from . import dispatch
from .entry import run_validated
from .problem import AttentionProblem, causal_band
from .validation import check_flash_attn, check_flash_attn_varlen

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _needs_alignment(is_causal: bool, left: int, right: int, alibi: bool,
                     q_lens: Sequence[int], kv_lens: Sequence[int]) -> bool:
    """Bottom-right alignment matters only with a band or ALiBi and a sequence where L != S;
    without it the problem stays top-left, which more kernels serve."""
    if not (is_causal or left >= 0 or right >= 0 or alibi):
        return False
    return any(lq != lk for lq, lk in zip(q_lens, kv_lens))


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, sinks: Optional[Tensor] = None,
                    backend: Optional[str] = None):
    """flash_attn.flash_attn_func: q (B, L, Hq, E), k (B, S, H, E), v (B, S, H, Ev) ->
    out (B, L, Hq, Ev); with return_attn_probs, (out, softmax_lse (B, Hq, L) float32, None).

    GQA is implied by Hq a multiple of H. `window_size=(left, right)`, -1 = unbounded; `causal`
    sets right = 0. `softcap` > 0: z = softcap * tanh(scale * q.k / softcap). `alibi_slopes`
    float32 (Hq,) or (B, Hq): - slope * |i + S - L - j| added to z. `sinks` (Hq,): a per-head
    logit in every row's normaliser that carries no value (differentiable). A row that may see
    no key gives 0. `deterministic` is accepted for compatibility (see the README for what each
    backend's backward guarantees). `backend`: None/"auto" or a backend name.
    """
    dropout_p, scale, window, softcap, slopes = check_flash_attn(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs, sinks)
    q_len, kv_len = q.shape[1], k.shape[1]
    is_causal, left, right = causal_band(causal, window)
    dropout_p, seed = dispatch.dropout_draw(dropout_p, q, k)
    problem = AttentionProblem(
        q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2), q_lens=(q_len,),
        kv_lens=(kv_len,), peers=(1,), gate=None, bias=None, kv_lengths=None, attn_mask=None,
        dropout_seed=seed, dropout_p=dropout_p, is_causal=is_causal, scale=scale, normalize="joint",
        window_left=left, window_right=right,
        bottom_right=_needs_alignment(is_causal, left, right, slopes is not None, (q_len,),
                                      (kv_len,)),
        softcap=softcap, alibi_slopes=slopes, sinks=sinks)
    out, lse = run_validated(problem, backend)
    out = out.transpose(1, 2).contiguous()  # flash-attn returns a contiguous (B, L, Hq, Ev)
    if return_attn_probs:
        return out, lse, None
    return out


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                           causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                           deterministic: bool = False, return_attn_probs: bool = False, *,
                           sinks: Optional[Tensor] = None, backend: Optional[str] = None):
    """flash_attn.flash_attn_varlen_func: packed q (total_q, Hq, E), k (total_k, H, E),
    v (total_k, H, Ev) with int32 cu_seqlens_q / cu_seqlens_k (batch + 1 offsets) ->
    out (total_q, Hq, Ev); with return_attn_probs, (out, softmax_lse (Hq, total_q), None).

    Sequence b (queries cu_seqlens_q[b]:cu_seqlens_q[b+1], keys cu_seqlens_k[b]:cu_seqlens_k[b+1])
    attends only within itself, its causal mask / window / ALiBi aligned bottom-right on its own
    L_b, S_b. The options are flash_attn_func's; dropout is not served here (ValueError) and
    ALiBi slopes must be the same for every sequence. Reads the offsets on the host (one sync).
    """
    q_lens, kv_lens, _, scale, window, softcap, slopes = check_flash_attn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, sinks)
    if not q_lens:  # batch 0 (cu_seqlens (1,)): one empty sequence has the same empty result
        q_lens, kv_lens, slopes = [0], [0], None
    is_causal, left, right = causal_band(causal, window)
    # one sequence is the plain one-stream problem; more are streams with the diagonal table
    peers = (1,) if len(q_lens) == 1 else ()
    problem = AttentionProblem(
        q=q.transpose(0, 1).unsqueeze(0), k=k.transpose(0, 1).unsqueeze(0),
        v=v.transpose(0, 1).unsqueeze(0), q_lens=tuple(q_lens), kv_lens=tuple(kv_lens),
        peers=peers, gate=None, bias=None, kv_lengths=None, attn_mask=None, dropout_seed=None,
        dropout_p=0.0, is_causal=is_causal, scale=scale, normalize="joint", window_left=left,
        window_right=right,
        bottom_right=_needs_alignment(is_causal, left, right, slopes is not None, q_lens, kv_lens),
        softcap=softcap, alibi_slopes=slopes, sinks=sinks)
    out, lse = run_validated(problem, backend)
    out = out[0].transpose(0, 1).contiguous()  # (total_q, Hq, Ev)
    if return_attn_probs:
        return out, lse[0], None
    return out
