"""The normalised attention problem: the one shape every backend sees.

Both public operations reduce to this (SDPA is the one-stream case):

    q     (B, Hq, Tq, E)    the S query streams packed along dim 2, Tq = sum(q_lens)
    k     (B, H,  Tk, E)    the S key streams packed along dim 2,   Tk = sum(kv_lens)
    v     (B, H,  Tk, Ev)
    q_lens, kv_lens         per-stream lengths (offsets are their prefix sums)
    peers                   S*S ints, row-major: peers[s * S + p] = 1 iff stream s attends to p
    gate  (B, S, S, Hq, Ev) or None: an expand()ed view, broadcast dims have stride 0
    bias  (B, S, S, Hq)     or None: an expand()ed view
    kv_lengths (B, S)       or None: keys of stream p at positions >= kv_lengths[b, p] are padding
    attn_mask (B, Hq, Tq, Tk) or None (S == 1 only): bool (True = may attend) or float (added),
                            usually an expand()ed view
    dropout_seed            None, or an int64 CPU tensor [seed, offset] (S == 1 only)
    dropout_p, is_causal (self pairs), scale, normalize ("joint" | "peer")
    window_left, window_right  band on the self pairs (-1 = unbounded; is_causal = right 0)
    bottom_right            alignment of causal/window/ALiBi on the self pairs: with
                            off = M_s - L_s (bottom-right) or 0 (top-left), query i of stream s
                            may see key j of s iff i + off - left <= j <= i + off + right
    softcap                 0, or z = softcap * tanh(scale * q.k / softcap) before bias and masks
    alibi_slopes (B, Hq)    or None: float32 view, - slope * |i + off - j| added on the self pairs
    sinks (Hq,)             or None ("joint" only): a per-head logit in every row's normaliser
                            with no value; the saved lse includes it

The peer table may be empty: `peers == ()` with S > 1 means the diagonal table (stream s attends
to itself only), the varlen case, so that thousands of sequences cost no S*S table.

GQA is implied by Hq != H: query head h reads key/value head h // (Hq / H).

A backend's forward returns (out (B, Hq, Tq, Ev) in q's dtype, lse), where lse is the natural-log
sum-exp of each row's scores, float32 (float64 for float64 inputs): (B, Hq, Tq) for "joint",
(B, Hq, S, Tq) for "peer" (-inf where a row has nothing to attend to). Its backward returns the
seven gradients (dq, dk, dv, dgate, dbias, dmask, dsinks) shaped like those inputs (gate/bias/mask in their
full expanded shape; autograd of the expand sums them down), or empty tensors where not needed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

JOINT, PEER = "joint", "peer"
NORMALIZE_MODES = (JOINT, PEER)


class AttentionProblem(NamedTuple):
    # The field order is the registered ops' argument order (see ops.py): keep them in step.
    # A NamedTuple: cheap to build on every call, and `op(*problem)` passes it straight to an op.
    q: Tensor
    k: Tensor
    v: Tensor
    q_lens: Tuple[int, ...]
    kv_lens: Tuple[int, ...]
    peers: Tuple[int, ...]
    gate: Optional[Tensor]
    bias: Optional[Tensor]
    kv_lengths: Optional[Tensor]
    attn_mask: Optional[Tensor]
    dropout_seed: Optional[Tensor]
    dropout_p: float
    is_causal: bool
    scale: float
    normalize: str
    # variants (SPEC section 9); the defaults are plain attention
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None

    def op_args(self) -> tuple:
        return tuple(self)

    @property
    def num_streams(self) -> int:
        return len(self.q_lens)

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    @property
    def num_q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    def stream_offsets(self, lens: Tuple[int, ...]):
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        return offsets

    @property
    def diagonal_peers(self) -> bool:
        """The varlen table: every stream attends to itself only (stored as peers == ())."""
        return len(self.peers) == 0

    def attends(self, s: int, p: int) -> bool:
        if not self.peers:
            return s == p
        return bool(self.peers[s * self.num_streams + p])

    def peers_flat(self) -> Tuple[int, ...]:
        """The S*S table, the diagonal one spelled out."""
        if self.peers:
            return self.peers
        n = self.num_streams
        return tuple(int(s == p) for s in range(n) for p in range(n))

    def peers_nested(self):
        n = self.num_streams
        return [[self.attends(s, p) for p in range(n)] for s in range(n)]

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def has_variants(self) -> bool:
        """Any SPEC section 9 option beyond plain attention (has_window spelled out: it is read
        on every call's backend selection)."""
        return (self.window_left >= 0 or self.window_right >= 0 or self.bottom_right
                or self.softcap > 0 or self.alibi_slopes is not None or self.sinks is not None)

    def self_offset(self, s: int) -> int:
        """Diagonal offset of stream s's self pair: M_s - L_s bottom-right, 0 top-left."""
        return self.kv_lens[s] - self.q_lens[s] if self.bottom_right else 0


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_shape(q: Tensor, num_streams: int, normalize: str) -> Tuple[int, ...]:
    batch, heads, q_total = q.shape[:3]
    if normalize == PEER:
        return (batch, heads, num_streams, q_total)
    return (batch, heads, q_total)


# The dropout keep mask of a call, kept on its seed tensor (which autograd saves for the backward)
# from the forward's draw to the backward: a backward that drew it again would run a random
# operation, which vmap refuses (gradcheck's batched-gradient check vmaps the backward).
_KEEP_MASK_ATTR = "_peer_attention_keep_mask"


def _keep_mask_key(problem: AttentionProblem):
    q = problem.q
    return (q.shape[0], q.shape[1], q.shape[2], problem.k.shape[2]), problem.dropout_p, q.device


def remember_keep_mask(problem: AttentionProblem, keep: Tensor) -> Tensor:
    """Keep `keep` (the forward's bool keep mask) with the problem's seed for its backward."""
    setattr(problem.dropout_seed, _KEEP_MASK_ATTR, (_keep_mask_key(problem), keep))
    return keep


def remembered_keep_mask(problem: AttentionProblem) -> Optional[Tensor]:
    """The keep mask the forward of this problem drew, or None (a seed no forward has used, or
    one reused for another shape or rate: the caller draws it again from the seed)."""
    saved = getattr(problem.dropout_seed, _KEEP_MASK_ATTR, None)
    if saved is None or saved[0] != _keep_mask_key(problem):
        return None
    return saved[1]
