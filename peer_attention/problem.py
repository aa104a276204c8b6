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
    dropout_p, is_causal (self pairs, top-left), scale, normalize ("joint" | "peer")

GQA is implied by Hq != H: query head h reads key/value head h // (Hq / H).

A backend's forward returns (out (B, Hq, Tq, Ev) in q's dtype, lse), where lse is the natural-log
sum-exp of each row's scores, float32 (float64 for float64 inputs): (B, Hq, Tq) for "joint",
(B, Hq, S, Tq) for "peer" (-inf where a row has nothing to attend to). Its backward returns the
six gradients (dq, dk, dv, dgate, dbias, dmask) shaped like those inputs (gate/bias/mask in their
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

    def peers_nested(self):
        n = self.num_streams
        return [[bool(self.peers[s * n + p]) for p in range(n)] for s in range(n)]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_shape(q: Tensor, num_streams: int, normalize: str) -> Tuple[int, ...]:
    batch, heads, q_total = q.shape[:3]
    if normalize == PEER:
        return (batch, heads, num_streams, q_total)
    return (batch, heads, q_total)
