"""The `torch` backend: peer attention composed of torch's own fused SDPA kernels.

SDPA is one kernel call. Joint peer attention without per-pair structure that needs them takes
the fused plan of torch_fused.py (a call per query stream over the concatenated keys, or one call
on the packed streams; `torch_fused.plan` is the rule). Otherwise (the pairs plan) it is one call
per attended stream pair (s, p), each giving the pair's output o_p and log-sum-exp l_p, merged per
query row:
  joint: L = logsumexp_p(l_p + bias_p) (and the sink), O = sum_p exp(l_p + bias_p - L) g_p * o_p
  peer:  O = sum_p g_p * o_p, the saved lse is l_p per peer.
Causal self pairs are the kernels' own (top-left) causal flag; kv_lengths an additive (B, 1, 1, M)
mask per key stream (a row of B*M numbers, not a score-sized mask); windows and bottom-right
alignment an additive (L, M) mask of the self pair; sinks a term of the joint merge.

Backward (MATH.md) through the same kernels' backward, which recomputes P = exp(scores - lse)
and D = <grad_out, out> from what it is given:
  joint: pair p gets lse = L - bias_p (so P is the global softmax), grad_out = dO and out = O (so
         D is the global <dO, O>), and values g_p * v_p (so <dO, values> is <dO * g_p, v>); dv is
         the result times g_p. dgate and dbias need o_p: that pair's forward runs again.
  peer:  pair p gets its own lse, grad_out = dO * g_p and out = o_p (its forward runs again).
A float attn_mask that requires grad gets dmask = P * (dP - D) computed explicitly (the kernels
do not return it): a score-sized computation, as is the mask itself.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..lse_merge import safe_logsumexp
from ..problem import JOINT, AttentionProblem, lse_dtype, lse_shape, mask_grad_shape
from ..reference import repeat_kv_heads
from .base import ALL_FLOAT_DTYPES, JOINT_ONLY, Backend, Capabilities
from .torch_decode import torch_decode
from .torch_dropout import dropout_backward, dropout_forward, keep_mask, replay_torch_rng
from .torch_fused import FUSED, fused_backward, fused_backward_serves, fused_forward, pairs_forced
from .torch_fused import plan as fused_plan
from .torch_pair import DEVICES, contiguous_lse, pair_backward, pair_forward
from .torch_pair import mark_empty_rows as _mark_empty_rows

NEG_INF = float("-inf")
_CUDA_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def _squeeze_broadcast(t: Tensor) -> Tensor:
    """The smallest tensor that broadcasts back to `t` (stride-0 dims of an expand() kept at 1)."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(t.shape, t.stride()))
    return t[index]


class PairPlan:
    """Per-call views and masks shared by the forward and the backward."""

    def __init__(self, problem: AttentionProblem):
        p = problem
        self.p = p
        self.compute = lse_dtype(p.q.dtype)
        self.q_off = p.stream_offsets(p.q_lens)
        n = p.num_streams
        self.peers = [[s] if p.diagonal_peers else [t for t in range(n) if p.peers[s * n + t]]
                      for s in range(n)]
        self._kv_masks = {}
        self.user_mask = _user_mask(p)
        self._k = self._v = None
        # gate and bias in the compute dtype, cast once per call (usually float32 already)
        self.gate, self.bias = _in_dtype(p.gate, self.compute), _in_dtype(p.bias, self.compute)
        self._pair_gates = self._pair_biases = None

    def pair_gates(self):
        """gate[:, s, p] as (B, H, 1, Ev) for every pair ([s][p]), or None."""
        if self._pair_gates is None and self.gate is not None:
            self._pair_gates = _by_pair(self.gate.unsqueeze(-2))
        return self._pair_gates

    def pair_biases(self):
        """bias[:, s, p] as (B, H, 1) for every pair, or None."""
        if self._pair_biases is None and self.bias is not None:
            self._pair_biases = _by_pair(self.bias.unsqueeze(-1))
        return self._pair_biases

    def rows(self, s: int):
        return slice(self.q_off[s], self.q_off[s + 1])

    def use_key_streams(self, keys, values):
        """Take the caller's own key and value streams (torch_streams.py: no packed k, v)."""
        self._k, self._v = keys, values

    def key_streams(self):
        """(k, v) of every key stream: one split per role per call, not a narrow per pair."""
        if self._k is None:
            lens = self.p.kv_lens
            self._k = self.p.k.split_with_sizes(lens, 2)
            self._v = self.p.v.split_with_sizes(lens, 2)
        return self._k, self._v

    def _key_mask(self, p: int) -> Optional[Tensor]:
        """The additive mask of any pair whose keys are stream p: attn_mask and kv_lengths."""
        lengths = self.p.kv_lengths
        mask = self.user_mask
        if lengths is None:
            return mask
        if p not in self._kv_masks:
            positions = torch.arange(self.p.kv_lens[p], device=lengths.device)
            padding = positions[None, :] >= lengths[:, p:p + 1]
            kv_mask = torch.zeros(padding.shape, dtype=self.p.q.dtype, device=self.p.q.device)
            self._kv_masks[p] = kv_mask.masked_fill_(padding.to(kv_mask.device), NEG_INF)[:, None, None, :]
        return self._kv_masks[p] if mask is None else mask + self._kv_masks[p]

    def banded(self, s: int, p: int) -> bool:
        """The self pair's visibility needs a mask: a window or bottom-right alignment (the
        kernels' own causal flag is top-left only)."""
        return s == p and (self.p.has_window or self.p.bottom_right)

    def causal(self, s: int, p: int) -> bool:
        """The kernels' own (top-left) causal flag for pair (s, p)."""
        return self.p.is_causal and s == p and not self.banded(s, p)

    def mask(self, s: int, p: int) -> Optional[Tensor]:
        mask = self._key_mask(p)
        if not self.banded(s, p):
            return mask
        band = _band_mask(self.p, s, self.p.q.dtype)
        return band if mask is None else mask + band

    def pair(self, s: int, p: int, q_s: Tensor, v: Optional[Tensor] = None):
        """(out, lse) of query stream s on key stream p; rows that see no key get lse -inf."""
        keys, values = self.key_streams()
        mask = self.mask(s, p)
        out, lse = pair_forward(q_s, keys[p], values[p] if v is None else v, mask,
                                self.causal(s, p), self.p.scale)
        if mask is not None:  # the CPU kernel reports lse 0 (not -inf) for such rows
            out, lse = _mark_empty_rows(out, lse, mask)
        return out, lse


def _in_dtype(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _user_mask(p: AttentionProblem) -> Optional[Tensor]:
    """attn_mask as the kernels take it: additive, at its smallest broadcast shape."""
    mask = p.attn_mask
    if mask is None:
        return None
    small = _squeeze_broadcast(mask)
    q_dtype = p.q.dtype
    if small.dtype == torch.bool:  # the kernels take additive masks only
        return torch.zeros(small.shape, dtype=q_dtype, device=small.device).masked_fill_(
            ~small, NEG_INF)
    if small.dtype != q_dtype and not (small.dtype == torch.float32 and q_dtype in
                                       (torch.float16, torch.bfloat16)):
        small = small.to(q_dtype)
    return small


def _band_mask(p: AttentionProblem, s: int, dtype) -> Tensor:
    """(L, M) additive mask of stream s's self pair: key j visible to query i iff
    i + off - left <= j <= i + off + right (off = M - L bottom-right, else 0; causal: right 0).
    A score-sized mask, as torch itself materialises for a lower-right CausalBias on the CPU."""
    q_len, kv_len = p.q_lens[s], p.kv_lens[s]
    device = p.q.device
    diagonal = (torch.arange(q_len, device=device)[:, None] + p.self_offset(s)
                - torch.arange(kv_len, device=device)[None, :])  # i + off - j
    right = 0 if p.is_causal else p.window_right
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= diagonal >= -right
    if p.window_left >= 0:
        visible &= diagonal <= p.window_left
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill_(~visible, NEG_INF)


def _sink(problem: AttentionProblem, compute) -> Optional[Tensor]:
    return None if problem.sinks is None else problem.sinks.to(compute)[None, :, None]


DENSE_TABLES = {n: (1,) * (n * n) for n in range(1, 17)}  # the all-ones peer table of n streams


def is_one_call(p: AttentionProblem) -> bool:
    """One kernel call on the packed q, k, v with the kernel's own flags, nothing to merge: SDPA as
    the drop-in sees it, or joint attention where every stream attends every stream with no
    per-pair term (then the packed tensors are what a user's torch.cat + one SDPA call sees)."""
    if (p.normalize != JOINT or p.gate is not None or p.bias is not None or p.sinks is not None
            or p.kv_lengths is not None or p.window_left >= 0 or p.window_right >= 0
            or p.bottom_right):
        return False
    streams = len(p.q_lens)
    if streams == 1:
        return p.peers == (1,) and p.q_lens[0] > 0 and p.kv_lens[0] > 0
    return (not p.is_causal and p.attn_mask is None and p.peers == DENSE_TABLES.get(streams)
            and p.q.shape[2] > 0 and p.k.shape[2] > 0 and not pairs_forced())


def _one_call_forward(p: AttentionProblem):
    mask = _user_mask(p)
    out, lse = pair_forward(p.q, p.k, p.v, mask, p.is_causal, p.scale)
    if mask is not None:  # the CPU kernel reports lse 0 (not -inf) for rows that see no key
        out, lse = _mark_empty_rows(out, lse, mask)
    # the kernels' layouts ((B, L, H, .) strides), as torch's own SDPA keeps them: the registered
    # op makes them contiguous (TorchBackend.op_outputs), the eager path saves them as they are
    return out, lse.to(lse_dtype(p.q.dtype))


def _forward(problem: AttentionProblem):
    p = problem
    if is_one_call(p):
        return _one_call_forward(p)
    plan = PairPlan(p)
    if fused_plan(p) == FUSED:
        return fused_forward(plan)
    q, compute = p.q, plan.compute
    value_dim = p.v.shape[-1]
    joint = p.normalize == JOINT
    num_streams = p.num_streams
    sink = _sink(p, compute)
    queries = q.split_with_sizes(p.q_lens, 2) if num_streams > 1 else (q,)
    kept = {} if _backward_reruns_pairs(p) else None
    # the merges write the op's packed, contiguous output straight (no cat of the streams at the
    # end) when they compute in its dtype
    packed = (q.new_empty((*q.shape[:3], value_dim)) if num_streams > 1 and compute == q.dtype
              else None)
    rows = _split(packed, p.q_lens, 2)
    # joint: a row's lse comes from its stream's merge; peer: (t, lse) of every attended pair
    outs, lses = [], []
    for s in range(num_streams):
        q_s = queries[s]
        dest = None if packed is None else rows[s]
        results = [(t, *plan.pair(s, t, q_s)) for t in plan.peers[s]
                   if p.kv_lens[t] > 0 and q_s.shape[2] > 0]
        if kept is not None:
            kept.update(((s, t), (o, l)) for t, o, l in results)
        simple = len(results) == 1 and p.gate is None and p.bias is None and sink is None
        if simple:
            o_s, l_s = results[0][1], results[0][2]
            if dest is not None:
                dest.copy_(o_s)
        elif joint:
            o_s, l_s = _merge_joint(p, plan, s, results, sink, q_s.shape, value_dim, dest)
        else:
            o_s = _merge_peer(p, plan, s, results, q_s.shape, value_dim, dest)
        if not joint:
            l_s = [(t, l) for t, _o, l in results]
        if num_streams == 1 and joint:  # the kernels' layouts are (B, L, H, .); the op's are contiguous
            return o_s.contiguous(), contiguous_lse(l_s)
        outs.append(o_s)
        lses.append(l_s)
    # cat (or contiguous) writes the op's layout from the kernels' (B, L, H, .) layouts; a lone
    # query stream whose merge wrote it already (Wan's video over text + image) needs no copy
    alone = [o for o in outs if o.shape[2] > 0]
    if packed is not None:
        out = packed
    elif len(alone) == 1 and alone[0].shape[2] == q.shape[2] and alone[0].is_contiguous():
        out = alone[0]
    else:
        out = torch.cat(outs, 2) if num_streams > 1 else outs[0].contiguous()
    lse = torch.cat(lses, 2) if joint else _peer_lse(p, plan, lses)
    if kept:
        setattr(lse, KEPT_PAIRS, kept)
    return out, lse


# The pair outputs the backward needs again (peer mode; gate or bias gradients), kept on the lse
# the forward returns: the eager path's autograd hands that very tensor to the backward, which then
# runs no pair forward again (as the composition's autograd keeps each pair's output). Elsewhere
# (the registered op) the attribute may be gone and the backward recomputes the same numbers.
KEPT_PAIRS = "_peer_attention_pair_outputs"


def _backward_reruns_pairs(p: AttentionProblem) -> bool:
    if p.normalize == JOINT and p.gate is None and p.bias is None:
        return False
    return any(t is not None and t.requires_grad for t in (p.q, p.k, p.v, p.gate, p.bias))


def _kept_or_again(plan, kept, s: int, t: int, q_s):
    """Pair (s, t)'s (out, lse) as the forward computed them."""
    pair = None if kept is None else kept.get((s, t))
    return plan.pair(s, t, q_s) if pair is None else pair


def _peer_lse(p, plan, lses):
    """The peer normalisation's lse (B, H, S, L): per query stream one stack of its pairs' lse
    (-inf, expanded, for a key stream it does not attend), and one cat of the streams (none when
    a single stream holds every row: Wan's video queries)."""
    num_streams = p.num_streams
    blocks = []
    for s, pairs in enumerate(lses):
        q_len = p.q_lens[s]
        if q_len == 0:
            continue
        if len(pairs) == num_streams:
            blocks.append(torch.stack([l for _t, l in pairs], 2))
            continue
        batch, heads = p.q.shape[:2]
        unseen = p.q.new_full((1, 1, 1), NEG_INF, dtype=plan.compute).expand(batch, heads, q_len)
        by_peer = dict(pairs)
        blocks.append(torch.stack([by_peer.get(t, unseen) for t in range(num_streams)], 2))
    if not blocks:
        return p.q.new_full(lse_shape(p.q, num_streams, p.normalize), NEG_INF, dtype=plan.compute)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 3)


def _merge_joint(p, plan, s, results, sink, q_shape, value_dim, dest=None):
    """O = sum_p exp(l_p + bias_p - L) g_p * o_p in the compute dtype. The lse and the bias and
    gate (cast once per call) promote the kernels' 16-bit outputs to it, so nothing else is cast.
    `dest`: the stream's rows of the packed output (compute dtype = q's), written in place."""
    batch, heads, q_len = q_shape[:3]
    compute, gates, biases = plan.compute, plan.pair_gates(), plan.pair_biases()
    shifted = [l if biases is None else l + biases[s][t] for t, _o, l in results]
    terms = shifted + ([sink.expand(batch, heads, q_len)] if sink is not None else [])
    if not terms:
        zeros = dest.zero_() if dest is not None else p.q.new_zeros(batch, heads, q_len, value_dim)
        return zeros, p.q.new_full((batch, heads, q_len), NEG_INF, dtype=compute)
    total, safe_total = safe_logsumexp(terms, compute)
    acc = None
    for (t, o, _l), l_shifted in zip(results, shifted):
        weight = torch.sub(l_shifted, safe_total).exp_()[..., None]
        if acc is None:
            acc = torch.mul(o, weight, out=dest) if dest is not None else o * weight
            if gates is not None:
                acc.mul_(gates[s][t])
        elif gates is None:
            acc.addcmul_(o, weight)
        else:
            acc.addcmul_(o * weight, gates[s][t])
    if acc is None:  # only the sink
        zeros = dest.zero_() if dest is not None else p.q.new_zeros(batch, heads, q_len, value_dim)
        return zeros, total
    return (acc if acc.dtype == p.q.dtype else acc.to(p.q.dtype)), total


def _merge_peer(p, plan, s, results, q_shape, value_dim, dest=None):
    """O = sum_p g_p * o_p; `dest` as for _merge_joint."""
    batch, heads, q_len = q_shape[:3]
    compute, gates = plan.compute, plan.pair_gates()
    if not results:
        return dest.zero_() if dest is not None else p.q.new_zeros(batch, heads, q_len, value_dim)
    # the first term (or the first two) written into a contiguous buffer in one pass, as the
    # composition's `out + part` does; the op's layout then needs no copy when this stream is alone
    acc = dest if dest is not None else p.q.new_empty((batch, heads, q_len, value_dim),
                                                      dtype=compute)
    t0, o0, _l = results[0]
    rest = results[1:]
    if gates is not None:
        torch.mul(o0, gates[s][t0], out=acc)
    elif rest:  # o + o promotes nothing: accumulate in the compute dtype
        torch.add(o0, rest[0][1], out=acc)
        rest = rest[1:]
    else:
        acc.copy_(o0)
    for t, o, _l in rest:
        if gates is None:
            acc.add_(o)
        else:
            acc.addcmul_(o, gates[s][t])
    return acc if acc.dtype == p.q.dtype else acc.to(p.q.dtype)


class _StreamSums:
    """The gradient of a packed q/k/v, summed per stream over the pairs it takes part in. A
    stream's first term is kept as it comes; its second is added straight into the stream's rows
    of one packed buffer (`torch.add(a, b, out=rows)`) and the rest in place there, so that a
    stream with several terms costs no copy of its own at the end; the streams of one term are
    copied in once (as a cat would), and a lone stream holding every row is summed in place and
    returned as is. Terms for every stream at once (add_packed) are summed in place, with no
    buffer."""

    def __init__(self, like: Tensor, lens, compute):
        self.like, self.lens, self.compute = like, lens, compute
        self.parts = [None] * len(lens)
        self.in_buffer = [False] * len(lens)
        self.packed = self.buffer = None

    def set_packed(self, grad: Tensor):
        """The gradient of every stream at once (one kernel call covered them all), as it comes."""
        self.packed = grad

    def add_packed(self, grad: Tensor):
        """A term for every stream at once (a fused call over all keys): the first kept as it comes
        (the backward owns it), the next added into it in place, as autograd sums the gradients of
        the composition's calls; no packed buffer of our own."""
        if self.packed is not None:
            self.packed.add_(grad)
        elif self.buffer is None and all(part is None for part in self.parts):
            self.packed = grad if grad.dtype == self.compute else grad.to(self.compute)
        else:
            for i, part in enumerate(_split(grad, self.lens, 2)):
                self.add(i, part)

    def _rows(self, i: int) -> Tensor:
        if self.buffer is None:
            like = self.like
            self.buffer = torch.empty(like.shape, dtype=self.compute, device=like.device)
            self.rows = self.buffer.split_with_sizes(self.lens, 2) if len(self.lens) > 1 \
                else (self.buffer,)
        return self.rows[i]

    def add(self, i: int, grad: Tensor):
        if self.packed is not None:
            _split(self.packed, self.lens, 2)[i].add_(grad)
            return
        part = self.parts[i]
        if part is None:
            self.parts[i] = grad if grad.dtype == self.compute else grad.to(self.compute)
        elif self.in_buffer[i] or self.lens[i] == self.like.shape[2]:
            # in its buffer rows, or a lone stream holding every row (Wan's video queries): its
            # first term is the backward's own (a kernel's gradient or a product): summed in place
            part.add_(grad)
        else:
            self.parts[i] = torch.add(part, grad, out=self._rows(i))
            self.in_buffer[i] = True

    def result(self) -> Tensor:
        like = self.like
        if self.packed is not None:
            return self.packed if self.packed.dtype == like.dtype else self.packed.to(like.dtype)
        filled = [part for part, n in zip(self.parts, self.lens) if n > 0]
        if self.buffer is None and len(filled) == 1 and filled[0] is not None and len(self.parts) > 1:
            # one stream holds every row (the others are empty): no copy (the registered op
            # makes it contiguous; the eager path takes the kernel's layout as is)
            total = filled[0]
        elif self.buffer is None and len(self.parts) == 1:
            total = self.parts[0].contiguous() if self.parts[0] is not None else \
                torch.zeros(like.shape, dtype=self.compute, device=like.device)
        else:
            for i, (part, n) in enumerate(zip(self.parts, self.lens)):
                if n == 0 or self.in_buffer[i]:
                    continue
                rows = self._rows(i)
                if part is None:
                    rows.zero_()
                else:
                    rows.copy_(part)
            total = self.buffer
        return total if total.dtype == like.dtype else total.to(like.dtype)


class _PairGrads:
    """The gradient of gate or bias (B, S, S, ...): one term per attended pair, stacked once
    when every pair has one, else written into a zero buffer."""

    def __init__(self, like: Tensor, compute):
        self.like, self.compute = like, compute
        self.parts = {}

    def set(self, s: int, t: int, grad: Tensor):
        self.parts[s, t] = grad

    def result(self) -> Tensor:
        like, n = self.like, self.like.shape[1]
        if len(self.parts) == n * n:
            total = torch.stack([torch.stack([self.parts[s, t] for t in range(n)], 1)
                                 for s in range(n)], 1)
        else:
            total = torch.zeros(like.shape, dtype=self.compute, device=like.device)
            for (s, t), grad in self.parts.items():
                total[:, s, t] = grad
        return total if total.dtype == like.dtype else total.to(like.dtype)


class _Grads:
    """Gradient sums (compute dtype for sums over pairs, cast once at the end)."""

    def __init__(self, problem: AttentionProblem, needs_grad, compute):
        p = problem
        self.dq = _StreamSums(p.q, p.q_lens, compute) if needs_grad[0] else None
        self.dk = _StreamSums(p.k, p.kv_lens, compute) if needs_grad[1] else None
        self.dv = _StreamSums(p.v, p.kv_lens, compute) if needs_grad[2] else None
        self.dgate = _PairGrads(p.gate, compute) if needs_grad[3] and p.gate is not None else None
        self.dbias = _PairGrads(p.bias, compute) if needs_grad[4] and p.bias is not None else None
        self.dsinks = (torch.zeros(p.sinks.shape, dtype=compute, device=p.sinks.device)
                       if needs_grad[6] and p.sinks is not None else None)

    def result(self, problem: AttentionProblem, dmask):
        p = problem
        # None for a gradient nobody asked for (the registered op fills in an empty tensor)
        out = [None if grad is None else grad.result()
               for grad in (self.dq, self.dk, self.dv, self.dgate, self.dbias)]
        out.append(dmask)
        out.append(None if self.dsinks is None else self.dsinks.to(p.sinks.dtype))
        return tuple(out)


def _sum_groups(t: Tensor, kv_heads: int) -> Tensor:
    groups = t.shape[1] // kv_heads
    return t if groups == 1 else t.unflatten(1, (kv_heads, groups)).sum(2)


def _one_call_backward(p: AttentionProblem, mask, causal: bool, grad_out, out, lse, needs_grad):
    """One pair, no merge (the pair's mask and the kernel's causal flag given): the kernel's
    gradients as they come."""
    if lse.dim() == 4:  # "peer" normalisation of one stream: (B, H, 1, L), the same numbers
        lse = lse[:, :, 0]
    if mask is not None:
        lse = lse.masked_fill(lse == NEG_INF, float("inf"))  # rows that see no key: P = 0
    dq, dk, dv = pair_backward(grad_out, p.q, p.k, p.v, out, lse, mask, causal, p.scale)
    dmask = None
    if needs_grad[5] and p.attn_mask is not None and p.attn_mask.dtype != torch.bool:
        dmask = _mask_grad(p, mask, causal, grad_out, lse)
    # in the kernel's layout ((B, L, H, .) strides on the CPU), as torch's own SDPA returns them;
    # the registered op makes them contiguous and fills the gradients nobody asked for
    # (ops.register_python_kernels), the eager path not
    return (dq if needs_grad[0] else None, dk if needs_grad[1] else None,
            dv if needs_grad[2] else None, None, None, dmask, None)


def _by_pair(t: Optional[Tensor]):
    """t[:, s, p] of a (B, S, S, ...) tensor for every pair, as nested tuples of views: two
    unbinds of one row each instead of two selects per pair."""
    return None if t is None else [row.unbind(1) for row in t.unbind(1)]


def _split(t: Optional[Tensor], lens, dim: int):
    """The streams of a packed tensor (views, one split)."""
    if t is None:
        return None
    return t.split_with_sizes(lens, dim) if len(lens) > 1 else (t,)


def _backward(problem: AttentionProblem, grad_out, out, lse, needs_grad):
    p = problem
    if is_one_call(p):
        return _one_call_backward(p, _user_mask(p), p.is_causal, grad_out, out, lse, needs_grad)
    plan = PairPlan(p)
    if (p.num_streams == 1 and plan.peers[0] == [0] and p.q_lens[0] > 0 and p.kv_lens[0] > 0
            and p.gate is None and p.bias is None and p.sinks is None):
        return _one_call_backward(p, plan.mask(0, 0), plan.causal(0, 0), grad_out, out, lse,
                                  needs_grad)
    compute = plan.compute
    kept = getattr(lse, KEPT_PAIRS, None)
    grads = _Grads(p, needs_grad, compute)
    if fused_backward_serves(p, needs_grad):
        return fused_backward(plan, grads, grad_out, out, lse, needs_grad)
    joint = p.normalize == JOINT
    heads, kv_heads = p.q.shape[1], p.k.shape[1]
    sink = _sink(p, compute)
    q_lens = p.q_lens
    keys, values = plan.key_streams()
    queries, d_outs, outs = _split(p.q, q_lens, 2), _split(grad_out, q_lens, 2), _split(out, q_lens, 2)
    lses = _split(_in_dtype(lse, compute), q_lens, -1)  # joint (B, H, L), peer (B, H, S, L)
    # per pair: gate (B, H, 1, Ev) and bias (B, H, 1) in the compute dtype, and their gradients
    gates, biases = plan.pair_gates(), plan.pair_biases()
    for s in range(p.num_streams):
        q_s = queries[s]
        if q_s.shape[2] == 0:
            continue
        d_out, o_s = d_outs[s].contiguous(), outs[s]  # the kernels take grad_out contiguous
        d_out_c = d_out if d_out.dtype == compute else d_out.to(compute)
        delta = None
        if joint and (grads.dbias is not None or grads.dsinks is not None):
            delta = (d_out_c * o_s).sum(-1)
        if joint:
            total = lses[s]
            lse_rows = total.masked_fill(total == NEG_INF, float("inf"))  # P = 0 on empty rows
        peers = [t for t in plan.peers[s] if p.kv_lens[t] > 0]
        for t in peers:
            causal, pair_mask = plan.causal(s, t), plan.mask(s, t)
            k_t, v_t = keys[t], values[t]
            gate = None if gates is None else gates[s][t]
            if joint:
                bias = None if biases is None else biases[s][t]
                lse_in = lse_rows if bias is None else lse_rows - bias
                k_in, v_in, expanded, g_in = k_t, v_t, False, gate
                if gate is not None:  # the kernel sees values g_p * v_p
                    if kv_heads != heads and p.gate.stride(3) != 0:  # a gate per query head
                        k_in, v_in, expanded = repeat_kv_heads(k_t, heads), repeat_kv_heads(v_t, heads), True
                    elif kv_heads != heads:
                        g_in = gate[:, :1]
                    v_in = v_in * g_in  # in the compute dtype (promoted), then the kernel's
                    if v_in.dtype != p.q.dtype:
                        v_in = v_in.to(p.q.dtype)
                dq, dk, dv = pair_backward(d_out, q_s, k_in, v_in, o_s, lse_in, pair_mask,
                                           causal, p.scale)
                if gate is not None:
                    dv = dv * g_in
                if expanded:
                    dk, dv = _sum_groups(dk, kv_heads), _sum_groups(dv, kv_heads)
                if grads.dgate is not None or grads.dbias is not None:
                    o_t, l_t = _kept_or_again(plan, kept, s, t, q_s)
                    # exp(l_t + bias - L): lse_in is L - bias, +inf on empty rows (weight 0)
                    weight = torch.sub(l_t, lse_in).exp_()
                    d_o = d_out_c * o_t  # dO * o_t in the compute dtype
                    if grads.dgate is not None:
                        grads.dgate.set(s, t, (d_o * weight[..., None]).sum(2))
                    if grads.dbias is not None:
                        rows = (d_o if gate is None else d_o * gate).sum(-1)
                        grads.dbias.set(s, t, rows.sub_(delta).mul_(weight).sum(-1))
            else:
                alone = len(peers) == 1 and gate is None
                o_t, l_t = (o_s, None) if alone else _kept_or_again(plan, kept, s, t, q_s)
                lse_in = lses[s][:, :, t]
                if pair_mask is not None:  # only a mask empties a row (lse -inf: Plan.pair)
                    lse_in = lse_in.masked_fill(lse_in == NEG_INF, float("inf"))
                g_out = d_out if gate is None else d_out_c * gate
                if g_out.dtype != p.q.dtype:
                    g_out = g_out.to(p.q.dtype)
                dq, dk, dv = pair_backward(g_out, q_s, k_t, v_t, o_t, lse_in, pair_mask,
                                           causal, p.scale)
                if grads.dgate is not None:
                    grads.dgate.set(s, t, (d_out_c * o_t).sum(2))
            if grads.dq is not None:
                grads.dq.add(s, dq)
            if grads.dk is not None:
                grads.dk.add(t, dk)
            if grads.dv is not None:
                grads.dv.add(t, dv)
        if grads.dsinks is not None:
            grads.dsinks -= (torch.exp(sink - total) * delta).sum((0, 2))
    dmask = None
    if needs_grad[5] and p.attn_mask is not None and p.attn_mask.dtype != torch.bool:
        dmask = _mask_grad(p, plan.mask(0, 0), plan.causal(0, 0), grad_out, lse)
    return grads.result(p, dmask)


def _mask_grad(p: AttentionProblem, mask: Tensor, causal: bool, grad_out, lse) -> Tensor:
    """d mask = P * (dP - D) (one stream, no gate or bias: the only problems with a mask)."""
    compute = lse_dtype(p.q.dtype)
    heads = p.q.shape[1]
    keys = repeat_kv_heads(p.k, heads).to(compute)
    values = repeat_kv_heads(p.v, heads).to(compute)
    scores = torch.matmul(p.q.to(compute), keys.transpose(-1, -2)) * p.scale
    scores = scores + mask.to(compute)  # attn_mask (and a band), as the forward saw it
    if causal:
        q_len, kv_len = scores.shape[-2:]
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, NEG_INF)
    total = lse.to(compute)
    total = total.masked_fill(total == NEG_INF, float("inf"))[..., None]
    probs = torch.exp(scores - total)
    d_probs = torch.matmul(grad_out.to(compute), values.transpose(-1, -2))
    # D = sum_j P dP in the compute dtype: <dO, O> would carry O's rounding to 16 bits
    delta = (probs * d_probs).sum(-1, keepdim=True)
    # summed over the dims the mask is broadcast along (problem.mask_grad_shape) in the compute
    # dtype, rounded once
    return (probs * (d_probs - delta)).sum_to_size(mask_grad_shape(p.attn_mask)).to(
        p.attn_mask.dtype)


class TorchBackend(Backend):
    name = "torch"
    capabilities = Capabilities(
        devices=DEVICES,
        dtypes=ALL_FLOAT_DTYPES,  # float64 on the CPU only (extra_reasons)
        sinks=True,
        diagonal_peers=True,
        window=True,        # through an (L, M) mask of the self pair: see _band_mask
        bottom_right=True,
    )
    # "peer" mode recomputes each pair's own statistics: joint only
    merged_statistics = JOINT_ONLY

    def prepare(self, problem: AttentionProblem) -> AttentionProblem:
        if problem.dropout_seed is None:
            return problem
        return replay_torch_rng(problem)  # torch's own dropout draw, from torch's RNG state

    def dropout_keep_mask(self, problem: AttentionProblem) -> Optional[Tensor]:
        return keep_mask(problem)

    def unavailable_reason(self) -> Optional[str]:
        aten = torch.ops.aten
        if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
            return "this torch has no fused SDPA kernel that returns the log-sum-exp"
        return None

    def extra_reasons(self, problem: AttentionProblem) -> List[str]:
        reasons = []
        if problem.dropout_p > 0 and (problem.has_window or problem.bottom_right):
            reasons.append("dropout with a window or bottom-right alignment (torch's math path "
                           "that replays its dropout is top-left causal only)")
        if problem.q.is_cpu:
            return reasons
        device = problem.q.device.type
        if device != "cpu":
            if problem.q.dtype not in _CUDA_DTYPES:
                reasons.append(f"dtype {problem.q.dtype} not served by torch's fused kernels on {device}")
            if problem.dropout_p > 0:
                reasons.append(f"dropout on {device}: torch's fused kernels draw their mask "
                               "inside the kernel, which a composition cannot replay")
        return reasons

    def decode_reasons(self, problem) -> List[str]:
        reasons = self.common_decode_reasons(problem)
        q = problem.q
        if not q.is_cpu and q.dtype not in _CUDA_DTYPES:
            reasons.append(f"dtype {q.dtype} not served by torch's fused kernels on {q.device.type}")
        return reasons

    def decode(self, problem):
        """Over a gathered cache (see torch_decode.py)."""
        return torch_decode(problem, _forward)

    def op_outputs(self, out: Tensor, lse: Tensor):
        # the lse copied in row blocks (contiguous_lse: a parallel copy costs milliseconds on a
        # loaded CPU)
        return out.contiguous(), contiguous_lse(lse)

    def forward(self, problem: AttentionProblem):
        if problem.dropout_p > 0:
            return dropout_forward(problem, _forward)
        return _forward(problem)

    def backward(self, problem: AttentionProblem, grad_out, out, lse, needs_grad):
        if problem.dropout_p > 0:
            return dropout_backward(problem, grad_out, needs_grad)
        return _backward(problem, grad_out, out, lse, needs_grad)
