"""The `torch` backend's fused plan for joint normalisation: one torch SDPA call per query stream
over the concatenated keys of the peers it attends, instead of one call per pair plus merges.

  keys    K_s = cat_p K_p, p in P(s) (the packed k itself when P(s) is every stream)
  values  V_s = cat_p g[s,p] * V_p: the gate folded into a scaled copy (the packed v without one)
  mask    an additive row per key, (B|1, H|1, 1, M): bias[s,p] on p's keys, -inf on kv_lengths
          padding; a causal self pair adds its (L_s, M_s) lower-triangular block
When every stream attends every stream with the same mask row (no gate, no bias, no causal self
pair), the packed q is one call: what `torch.cat` of the streams + one SDPA + a split computes.

The kernel's lse is then the joint lse, the same numbers the pair plan saves, so either plan's
backward serves either plan's forward. Backward: the same call's backward gives dq_s, dK_s, dV_s;
dv_p = g[s,p] * dV_s[p] and dgate[s,p] = sum_j dV_s[p] * V_p, with no forward run again. dbias
(= sum of dS over a pair's block) on short float32/64 streams: the backward passes the bias as one
more feature, q_s | 1 and K_s | bias[s,p] / scale (the same scores), so that dK's last column is
scale * sum_i dS_ij; elsewhere the pair plan serves a bias that requires grad (its forward keeps
the pair outputs for its backward).

`plan(problem)` says which plan a call takes (the rule is measured: see docs/torch_backend.md).
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional

import torch
from torch import Tensor

from ..problem import JOINT, AttentionProblem
from .torch_pair import NEG_INF, mark_empty_rows, pair_backward, pair_forward

PAIRS, FUSED = "pairs", "fused"
_FULL_PRECISION = (torch.float32, torch.float64)


def fused_serves(p: AttentionProblem) -> bool:
    """The fused plan computes this problem exactly: joint, no per-pair structure it cannot write
    as a key row or the self pair's causal block."""
    return (p.normalize == JOINT and p.attn_mask is None and p.sinks is None
            and p.dropout_p == 0 and p.window_left < 0 and p.window_right < 0
            and not p.bottom_right and p.softcap == 0 and p.alibi_slopes is None
            # a gate in V rounds g * v to 16 bits (the pair plan multiplies in float32); with GQA
            # it would need K/V repeated per query head
            and (p.gate is None or (p.q.dtype in _FULL_PRECISION and p.k.shape[1] == p.q.shape[1])))


# Causal self pairs: the fused call computes the masked half of each self block that the pair
# plan's causal kernel skips, and reads an (L_s, M) mask. Measured on the 2-core CPU (torch 2.11,
# the two plans forced in alternation, B 2, gate + bias + causal): fused 1.3-1.5x faster at 3
# streams of <= 128 tokens, even at 256 (0.96x), and 0.45x at 256 without gate or bias (the pairs
# then need no merge weights). The rule: fused while the longest query stream is <= 128 tokens.
CAUSAL_FUSED_MAX_QUERIES = 128
# A bias that requires grad: the fused backward takes it as a key column (with_bias_column) while
# the longest query stream is this short; the pair plan otherwise (measured on the 2-core CPU at
# tiny shapes only, see docs/torch_backend.md, fifth pass).
BIAS_GRAD_FUSED_MAX_QUERIES = 128


_forced: list = []  # innermost forced_plan() last


@contextlib.contextmanager
def forced_plan(name: str):
    """Take plan `name` wherever it can serve (the bench times both plans; tests check both)."""
    if name not in (PAIRS, FUSED):
        raise ValueError(f"forced_plan: expected {PAIRS!r} or {FUSED!r}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def pairs_forced() -> bool:
    return bool(_forced) and _forced[-1] == PAIRS


def plan(p: AttentionProblem) -> str:
    """FUSED or PAIRS for the forward (the backward decides again: fused_backward_serves)."""
    if p.num_streams == 1 or not fused_serves(p) or sum(p.q_lens) == 0 or sum(p.kv_lens) == 0:
        return PAIRS
    if _forced:
        return _forced[-1]
    if p.bias is not None and p.bias.requires_grad and not bias_column_serves(p):
        return PAIRS  # dbias needs each pair's output: the pair plan's forward keeps them
    if p.q.device.type != "cpu" and (p.bias is not None or p.kv_lengths is not None or p.is_causal):
        return PAIRS  # the CUDA kernel takes its bias at the full (B, H, L, M) shape: no key rows
    if p.is_causal and max(p.q_lens) > CAUSAL_FUSED_MAX_QUERIES:
        return PAIRS
    return FUSED


def fused_backward_serves(p: AttentionProblem, needs_grad) -> bool:
    return plan(p) == FUSED and not (needs_grad[4] and p.bias is not None
                                     and not bias_column_serves(p))


class QueryStreams:
    """Per query stream: its attended key streams, the concatenated K and gated V, the mask."""

    def __init__(self, pair_plan, packed: bool = True):
        self.pp = pair_plan
        p = pair_plan.p
        self.p = p
        # packed: p.k / p.v hold every key stream (the op's problem); else the pair plan's key
        # streams are the caller's own tensors (torch_streams.py) and values are built with
        # differentiable ops
        self.packed = packed
        self._all_keys = None
        self.nonempty = [t for t in range(p.num_streams) if p.kv_lens[t] > 0]
        self.kv_off = p.stream_offsets(p.kv_lens)
        self._rows = False  # not built yet (None: no row terms)
        self.bias_in_keys = False  # the backward's dbias: see with_bias_column
        self._bias_rows = None

    def attended(self, s: int) -> List[int]:
        return [t for t in self.pp.peers[s] if self.p.kv_lens[t] > 0]

    def keys(self, attended: List[int]) -> Tensor:
        if attended == self.nonempty and self.packed:
            return self.p.k
        keys, _ = self.pp.key_streams()
        if len(attended) == 1:
            return keys[attended[0]]
        if attended != self.nonempty:
            return torch.cat([keys[t] for t in attended], 2)
        if self._all_keys is None:  # every key: one cat per call, shared by the query streams
            self._all_keys = torch.cat([keys[t] for t in attended], 2)
        return self._all_keys

    def values(self, s: int, attended: List[int]) -> Tensor:
        p = self.p
        gates = self.pp.pair_gates()
        if gates is None:
            if attended == self.nonempty and self.packed:
                return p.v
            _, values = self.pp.key_streams()
            if len(attended) == 1:
                return values[attended[0]]
            return torch.cat([values[t] for t in attended], 2)
        _, values = self.pp.key_streams()
        if gates[s][attended[0]].dtype != p.q.dtype or not self.packed:
            # fused_serves: float32/64 q, the gate promotes; or products autograd differentiates
            scaled = torch.cat([values[t] * gates[s][t] for t in attended], 2)
            return scaled.to(p.q.dtype)
        # each g * v_p written straight into its rows of one buffer: one pass, no cat
        batch, heads = p.q.shape[:2]
        scaled = p.v.new_empty((batch, heads, sum(p.kv_lens[t] for t in attended), p.v.shape[-1]))
        for t, rows in zip(attended, scaled.split_with_sizes([p.kv_lens[t] for t in attended], 2)):
            torch.mul(values[t], gates[s][t], out=rows)
        return scaled

    def bias_rows(self) -> Tensor:
        """(B, H, S, Tk): bias[s, p] on each of p's packed keys (built once per call)."""
        if self._bias_rows is None:
            p = self.p
            repeats, _, _ = _key_layout(tuple(p.kv_lens), p.q.device)
            # (B, S, S, H) -> (B, H, S, S) -> each peer's value on its keys
            self._bias_rows = self.pp.bias.permute(0, 3, 1, 2).repeat_interleave(
                repeats, dim=3, output_size=p.k.shape[2])
        return self._bias_rows

    def rows(self) -> Optional[Tensor]:
        """(B|1, H|1, S, Tk) additive terms of every query stream on every packed key: bias[s, p]
        on p's keys (unless the bias is a key column: key_column), -inf on kv_lengths padding;
        None without either. A few ops for all streams."""
        if self._rows is not False:
            return self._rows
        p = self.p
        rows = None
        if p.bias is not None and not self.bias_in_keys:
            rows = self.bias_rows()
        if p.kv_lengths is not None:
            _, stream_of_key, position = _key_layout(tuple(p.kv_lens), p.kv_lengths.device)
            padding = position >= p.kv_lengths[:, stream_of_key]  # (B, Tk)
            dtype = self.pp.compute if rows is not None else p.q.dtype
            pad = torch.where(padding, NEG_INF, 0.0).to(device=p.q.device, dtype=dtype)[:, None, None]
            rows = pad if rows is None else rows + pad
        self._rows = rows
        return rows

    def mask(self, s: int, attended: List[int]) -> Optional[Tensor]:
        """The additive mask of query stream s over its concatenated keys, or None."""
        p = self.p
        rows = self.rows()
        if rows is not None:
            if rows.shape[2] > 1:  # a bias: one row per query stream (else one for all)
                rows = rows[:, :, s:s + 1]
            if attended != self.nonempty:
                index = _key_index(tuple(attended), tuple(self.kv_off), rows.device)
                rows = rows.index_select(3, index)
        if not (p.is_causal and s in attended):
            return rows
        self_at = sum(p.kv_lens[t] for t in attended[:attended.index(s)])
        kv_total = sum(p.kv_lens[t] for t in attended)
        dtype = rows.dtype if rows is not None else p.q.dtype
        block = _causal_rows(p.q_lens[s], kv_total, self_at, p.kv_lens[s], dtype, p.q.device)
        return block if rows is None else rows + block

    def rows_can_empty(self) -> bool:
        """Whether a query row's mask can hide every key: kv_lengths padding, or a bias of -inf
        (one check per call). A causal self block alone never does: row i sees key 0 of its own
        stream. Without either, no row needs marking after the kernel (mark_empty_rows: three
        ops per call of the kernel)."""
        p = self.p
        return p.kv_lengths is not None or (
            p.bias is not None and bool(torch.isneginf(p.bias).any()))

    def one_call(self) -> bool:
        """Every query stream sees the same keys with the same mask row: the packed q is one call."""
        p = self.p
        return (p.gate is None and p.bias is None and not p.is_causal
                and all(self.attended(s) == self.nonempty for s in range(p.num_streams)))


    def with_bias_column(self, s: int, attended: List[int], q_s: Tensor, keys: Tensor):
        """(q_s | 1, K_s | bias[s, p] / scale): the bias as one more feature, so that the
        kernel's dK carries dbias in its last column (scale * sum_i dS_ij per key j); the
        scores are those of the bias row. Set bias_in_keys before the masks are built."""
        p = self.p
        column = self.bias_rows()[:, :, s]
        if attended != self.nonempty:
            column = column.index_select(2, _key_index(tuple(attended), tuple(self.kv_off),
                                                       column.device))
        ones = q_s.new_ones((*q_s.shape[:3], 1))
        column = (column / p.scale).to(keys.dtype)[..., None].expand(*keys.shape[:3], 1)
        return torch.cat([q_s, ones], -1), torch.cat([keys, column], -1)


def bias_column_serves(p: AttentionProblem) -> bool:
    """The fused backward computes dbias through a key column (with_bias_column): q in
    float32/float64 (a 16-bit column would round the bias differently from the forward's mask
    row), one key head per query head, and short query streams (measured where it pays: see
    docs/torch_backend.md). A -inf bias is a -inf score as in the mask row; the NaN that
    0 * -inf leaves in dq's extra column is dropped with that column. The column holds
    bias / scale: not for a scale of 0 (or one so small that the quotient could overflow)."""
    return (p.bias is not None and p.q.dtype in _FULL_PRECISION and abs(p.scale) >= 2.0 ** -20
            and p.k.shape[1] == p.q.shape[1] and max(p.q_lens) <= BIAS_GRAD_FUSED_MAX_QUERIES)


def _kept(builder):
    """A per-shape table kept across calls (a training loop repeats its shapes); built as a normal
    tensor even inside inference_mode, so that later calls outside it may use it."""
    @functools.lru_cache(maxsize=64)
    def kept(*args):
        with torch.inference_mode(False):
            return builder(*args)
    return kept


@_kept
def _key_layout(kv_lens, device):
    """(per-stream key counts, stream of each packed key, its position in its stream) as tensors."""
    counts = torch.tensor(kv_lens, device=device)
    stream = torch.repeat_interleave(torch.arange(len(kv_lens), device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return counts, stream, torch.arange(int(sum(kv_lens)), device=device) - starts[stream]


@_kept
def _key_index(attended, kv_off, device):
    """The packed positions of the attended streams' keys, in order."""
    return torch.cat([torch.arange(kv_off[t], kv_off[t + 1], device=device) for t in attended])


@_kept
def _segments(kv_lens, dtype, device):
    """(M, n) one-hot: each key of n concatenated streams -> its stream (sums per stream as one
    matmul)."""
    one_hot = torch.zeros(sum(kv_lens), len(kv_lens), dtype=dtype, device=device)
    start = 0
    for i, n in enumerate(kv_lens):
        one_hot[start:start + n, i] = 1
        start += n
    return one_hot


_CACHED_MASK_ELEMENTS = 1 << 20  # larger causal tables are built per call, not kept


def _causal_rows(q_len, kv_total, self_at, self_len, dtype, device) -> Tensor:
    """(1, 1, L, M) additive: 0, except -inf above the diagonal of the self pair's block (key j of
    the self stream visible to query i iff j <= i, top-left as the kernels' flag)."""
    if q_len * kv_total <= _CACHED_MASK_ELEMENTS:
        return _cached_causal_rows(q_len, kv_total, self_at, self_len, dtype, device)
    return _build_causal_rows(q_len, kv_total, self_at, self_len, dtype, device)


def _build_causal_rows(q_len, kv_total, self_at, self_len, dtype, device) -> Tensor:
    hidden = torch.ones(q_len, self_len, dtype=torch.bool, device=device).triu_(1)
    mask = torch.zeros(q_len, kv_total, dtype=dtype, device=device)
    mask[:, self_at:self_at + self_len].masked_fill_(hidden, NEG_INF)
    return mask[None, None]


_cached_causal_rows = _kept(_build_causal_rows)


def fused_forward(pair_plan):
    """(out, lse) of the joint problem, one kernel call per query stream (or one in all)."""
    p = pair_plan.p
    streams = QueryStreams(pair_plan)
    if streams.one_call():
        mask = streams.mask(0, streams.nonempty)
        return _call(p.q, p.k, p.v, mask, p.scale)  # the kernel's layouts (op_outputs: the op's)
    batch, heads = p.q.shape[:2]
    can_empty = streams.rows_can_empty()
    outs, lses = [], []
    # the gated values, kept for the eager backward as the composition's autograd keeps its g * v
    kept = {} if p.gate is not None and any(
        t.requires_grad for t in (p.q, p.k, p.v, p.gate)) else None
    for s, q_s in enumerate(p.q.split_with_sizes(p.q_lens, 2)):
        attended = streams.attended(s)
        if not attended or q_s.shape[2] == 0:
            outs.append(q_s.new_zeros(batch, heads, q_s.shape[2], p.v.shape[-1]))
            lses.append(q_s.new_full((batch, heads, q_s.shape[2]), NEG_INF, dtype=pair_plan.compute))
            continue
        values = streams.values(s, attended)
        if kept is not None:
            kept[s] = values
        out, lse = _call(q_s, streams.keys(attended), values, streams.mask(s, attended), p.scale,
                         can_empty)
        outs.append(out)
        lses.append(lse)
    # cat writes the op's layout from the kernels' (B, L, H, .) layouts
    lse = torch.cat(lses, 2)
    if kept:
        setattr(lse, KEPT_VALUES, kept)
    return torch.cat(outs, 2), lse


# The gated values of each query stream, kept on the lse the forward returns (the eager path's
# autograd hands that very tensor to the backward); elsewhere the backward computes them again.
KEPT_VALUES = "_peer_attention_fused_values"


def _call(q, k, v, mask, scale, can_empty: bool = True):
    out, lse = pair_forward(q, k, v, mask, False, scale)
    if mask is not None and can_empty:  # the CPU kernel reports lse 0, not -inf, on empty rows
        out, lse = mark_empty_rows(out, lse, mask)
    return out, lse


def fused_backward(pair_plan, grads, grad_out, out, lse, needs_grad):
    """The seven gradients of the fused plan (grads: torch_backend._Grads of this problem)."""
    p = pair_plan.p
    streams = QueryStreams(pair_plan)
    if streams.one_call():
        mask = streams.mask(0, streams.nonempty)
        dq, dk, dv = pair_backward(grad_out, p.q, p.k, p.v, out, lse_in(lse, mask), mask, False,
                                   p.scale)
        for sums, grad in ((grads.dq, dq), (grads.dk, dk), (grads.dv, dv)):
            if sums is not None:
                sums.set_packed(grad)
        return grads.result(p, None)
    gates = pair_plan.pair_gates()
    _, values = pair_plan.key_streams()
    kept = getattr(lse, KEPT_VALUES, None) or {}
    can_empty = streams.rows_can_empty()
    # dbias: the bias as a key column (bias_column_serves, checked by fused_backward_serves)
    streams.bias_in_keys = grads.dbias is not None
    width = p.q.shape[-1]
    lens = p.q_lens
    for s, (q_s, d_out, o_s, l_s) in enumerate(zip(
            p.q.split_with_sizes(lens, 2), grad_out.split_with_sizes(lens, 2),
            out.split_with_sizes(lens, 2), lse.split_with_sizes(lens, -1))):
        attended = streams.attended(s)
        if not attended or q_s.shape[2] == 0:
            continue
        mask = streams.mask(s, attended)
        scaled = kept[s] if s in kept else streams.values(s, attended)
        keys = streams.keys(attended)
        kv_lens = [p.kv_lens[t] for t in attended]
        if streams.bias_in_keys:
            q_s, keys = streams.with_bias_column(s, attended, q_s, keys)
        dq, dk, dv = pair_backward(d_out, q_s, keys, scaled,
                                   o_s, lse_in(l_s, mask if can_empty else None), mask, False,
                                   p.scale)
        def segments():  # (M, n) one-hot: per-stream sums over the keys as one matmul
            return _segments(tuple(kv_lens), dk.dtype, dk.device)

        if streams.bias_in_keys:  # dK's last column: scale * sum_i dS_ij, summed per stream
            per_pair = torch.matmul(dk.select(-1, width), segments()).mul_(1 / p.scale)
            for i, t in enumerate(attended):
                grads.dbias.set(s, t, per_pair.select(-1, i))
            dq, dk = dq.narrow(-1, 0, width), dk.narrow(-1, 0, width)
        if grads.dq is not None:
            grads.dq.add(s, dq)
        every_key = attended == streams.nonempty  # its dK, dV cover the packed keys
        dv_rows = dv.split_with_sizes(kv_lens, 2)
        if gates is not None:  # values g * v: dgate = sum_j dV * v, then dv = g * dV in place
            # (dV is this backward's own: fused_serves has q, hence dV, in the compute dtype)
            if grads.dgate is not None and every_key:  # per stream: one product, one matmul
                per_pair = torch.matmul(segments().t(), dv * p.v)
                for i, t in enumerate(attended):
                    grads.dgate.set(s, t, per_pair.select(2, i))
            elif grads.dgate is not None:
                for t, dv_t in zip(attended, dv_rows):
                    grads.dgate.set(s, t, (dv_t * values[t]).sum(2))
            if grads.dv is not None:
                for t, dv_t in zip(attended, dv_rows):
                    dv_t.mul_(gates[s][t])
        if every_key:  # dK, dV over the packed keys: summed in place over the query streams
            for sums, grad in ((grads.dk, dk), (grads.dv, dv)):
                if sums is not None:
                    sums.add_packed(grad)
            continue
        for t, dk_t, dv_t in zip(attended, dk.split_with_sizes(kv_lens, 2), dv_rows):
            if grads.dk is not None:
                grads.dk.add(t, dk_t)
            if grads.dv is not None:
                grads.dv.add(t, dv_t)
    return grads.result(p, None)


def lse_in(lse: Tensor, mask) -> Tensor:
    """The lse the kernel's backward recomputes P from: +inf on rows that saw no key (P = 0)."""
    return lse if mask is None else lse.masked_fill(lse == NEG_INF, float("inf"))
