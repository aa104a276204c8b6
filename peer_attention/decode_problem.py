"""The decode problem: attention of a few query rows over each sequence's keys in a KV cache.

What flash_attn_with_kvcache (SPEC section 12) hands a backend, after validation, the rotary
embedding and the in-place append:

    q           (B, Lq, Hq, E)        the query rows (rotated already), any strides
    k_cache     (B_cache, S_max, H, E) contiguous cache, or paged (num_blocks, page_size, H, E)
    v_cache     same first three dims, last Ev
    block_table (B, max_blocks) int32 or None (paged): logical position t of sequence b lies in
                block block_table[b, t // page_size], row t % page_size
    batch_idx   (B,) int32 or None (contiguous only): the cache row of sequence b (default b)
    leftpad     (B,) int32 or None: sequence b's keys start at cache position leftpad[b]
    seqlens     (B,) int32: keys of sequence b (append included), counted from leftpad[b]; key j
                of sequence b is at cache position leftpad[b] + j
    max_seqlen  host max of seqlens (launch sizes)
    scale, window_left, window_right (causal folded in: right = 0; -1 unbounded), softcap,
    alibi_slopes (B, Hq) float32 or None, sinks (Hq,) or None
    num_splits  0 = the backend's choice; only speed depends on it
    min_seqlen  host min of seqlens (-1: unknown); equal to max_seqlen, with no block table,
                batch rows or leftpad, the keys are the plain slice k_cache[:B, :max_seqlen]
    bottom_right  True (flash-attn): query i may see key j iff
                i + off - left <= j <= i + off + right with off = seqlens[b] - Lq; False: off = 0
                (top-left, SDPA's is_causal, for the drop-in's decode route); ALiBi adds
                - slope * |i + off - j|.

A backend's decode(problem) returns (out (B, Lq, Hq, Ev) in q's dtype, lse (B, Hq, Lq) float32,
float64 for float64 inputs; -inf where a row sees no key and there is no sink). GQA: query head h
reads key/value head h // (Hq / H).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


class DecodeProblem(NamedTuple):
    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    block_table: Optional[Tensor]
    batch_idx: Optional[Tensor]
    leftpad: Optional[Tensor]
    seqlens: Tensor
    max_seqlen: int
    scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    num_splits: int = 0
    bottom_right: bool = True
    min_seqlen: int = -1

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def value_dim(self) -> int:
        return self.v_cache.shape[3]

    @property
    def num_q_heads(self) -> int:
        return self.q.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2]

    @property
    def has_band(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def plain_slice(self) -> bool:
        """Every sequence's keys are k_cache[b, :max_seqlen]: no gather needed."""
        return (self.block_table is None and self.batch_idx is None and self.leftpad is None
                and self.min_seqlen == self.max_seqlen)


def key_slots(problem: DecodeProblem, length: int, align_right: bool = False):
    """Where the keys of every sequence lie: (rows, slots, valid), each (B, length). Column c is
    key c of the sequence (align_right=False), or key c - (length - seqlens[b]) (align_right:
    the keys end at the last column, padding on the left). rows/slots index dims 0/1 of the
    cache; invalid columns point at (0, 0) and are marked False in `valid`."""
    q = problem.q
    batch, device = q.shape[0], q.device
    columns = torch.arange(length, device=device)[None, :]
    counts = problem.seqlens.to(device=device, dtype=torch.long)[:, None]
    keys = columns - (length - counts) if align_right else columns.expand(batch, length)
    valid = (keys >= 0) & (keys < counts)
    positions = torch.where(valid, keys, 0)
    if problem.leftpad is not None:
        positions = positions + problem.leftpad.long()[:, None]
    positions = torch.where(valid, positions, 0)
    if problem.paged:
        page = problem.k_cache.shape[1]
        rows = problem.block_table.long().gather(1, positions // page)
        return torch.where(valid, rows, 0), positions % page, valid
    if problem.batch_idx is not None:
        rows = problem.batch_idx.long()[:, None].expand(batch, length)
    else:
        rows = torch.arange(batch, device=device)[:, None].expand(batch, length)
    return rows, positions, valid


def gather_keys(problem: DecodeProblem, length: int, align_right: bool = False
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """(k (B, length, H, E), v (B, length, H, Ev), valid (B, length)): each sequence's keys copied
    out of the cache (key_slots' placement; invalid columns hold some cache row, to be masked)."""
    rows, slots, valid = key_slots(problem, length, align_right)
    return problem.k_cache[rows, slots], problem.v_cache[rows, slots], valid


@functools.lru_cache(maxsize=64)
def _equal_counts(batch: int, count: int, device) -> Tensor:
    """(batch,) int32 filled with `count`, made once per shape and device: the drop-in's decode
    route runs every generated token, and a fill launch per call is avoidable overhead (the
    tensor is only ever read)."""
    return torch.full((batch,), count, dtype=torch.int32, device=device)


def from_attention(problem, max_query_len: int, min_keys: int) -> Optional[DecodeProblem]:
    """The decode problem of an attention problem with a decode shape (every sequence L <=
    max_query_len queries, the longest S >= min_keys keys), or None. Served: one stream (the
    drop-in SDPA, flash_attn_func), its keys read in place as a contiguous cache (B, S, H, E);
    and varlen batches (the diagonal peer table) whose sequences all have the same query count,
    the packed keys read in place as one cache row with each sequence's start as its leftpad.
    Not served (None): a mask, dropout, gate, bias, kv_lengths, several streams otherwise."""
    p = problem
    if (p.normalize != "joint" or p.attn_mask is not None or p.dropout_p > 0 or p.gate is not None
            or p.bias is not None or p.kv_lengths is not None):
        return None
    one_stream = len(p.q_lens) == 1 and p.peers == (1,)
    varlen = p.diagonal_peers and len(set(p.q_lens)) == 1 and p.q.shape[0] == 1
    if not (one_stream or varlen):
        return None
    q_len = p.q_lens[0]
    if not 0 < q_len <= max_query_len or max(p.kv_lens) < min_keys:
        return None
    left, right = p.window_left, p.window_right
    if p.is_causal:
        right = 0 if right < 0 else min(right, 0)
    device = p.q.device
    k, v = p.k.transpose(1, 2), p.v.transpose(1, 2)  # (B0, S, H, .): the cache, in place
    if one_stream:
        batch = p.q.shape[0]
        q = p.q.transpose(1, 2)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # (a cached tensor made during a CUDA graph capture would live in its private pool)
            seqlens = torch.full((batch,), p.kv_lens[0], dtype=torch.int32, device=device)
        else:
            seqlens = _equal_counts(batch, p.kv_lens[0], device)
        batch_idx = leftpad = None
    else:  # sequence b: queries b*L .. (b+1)*L - 1, keys at the packed offset kv_off[b]
        batch = len(p.q_lens)
        q = p.q.transpose(1, 2).reshape(batch, q_len, p.q.shape[1], p.q.shape[3])
        seqlens = torch.tensor(p.kv_lens, dtype=torch.int32, device=device)
        leftpad = torch.tensor(p.stream_offsets(p.kv_lens)[:-1], dtype=torch.int32, device=device)
        batch_idx = torch.zeros(batch, dtype=torch.int32, device=device)
    slopes = p.alibi_slopes
    if slopes is not None and slopes.shape[0] != batch:  # varlen: one row serves every sequence
        slopes = slopes.expand(batch, slopes.shape[1])
    return DecodeProblem(q, k, v, None, batch_idx, leftpad, seqlens, max(p.kv_lens), p.scale,
                         left, right, p.softcap, slopes, p.sinks, 0, bool(p.bottom_right),
                         min(p.kv_lens))


def decode_outputs(route: DecodeProblem, out: Tensor, lse: Tensor):
    """Views of an attention problem's out (B0, Hq, T, Ev) and lse (B0, Hq, T) in the decode
    layouts (B, Lq, Hq, Ev) and (B, Hq, Lq), for from_attention's route to write into."""
    batch, q_len, heads, _ = route.q.shape
    out_view = out.transpose(1, 2).reshape(batch, q_len, heads, out.shape[-1])
    if lse.shape[0] == batch:
        return out_view, lse
    return out_view, lse[0].view(heads, batch, q_len).transpose(0, 1)
