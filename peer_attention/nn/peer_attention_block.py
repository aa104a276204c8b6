"""PeerAttention: a multi-stream attention block with AssembleNet++-style dynamic peer gates.

S streams (modalities, blocks of a network) of widths dims[s] attend to each other through one
fused `peer_attention.peer_attention` call. The weight of each connection (s attends to p) is a
per-head, per-channel gate on p's values as seen by s, computed from the streams themselves:

    d_q      = descriptor_proj[q](masked mean of x_q over its valid tokens)      (B, D)
    m_{s,p}  = sum_q softmax(mix_logits[s, p])[q] * d_q                          (B, D)
    gate_sp  = sigmoid(gate_weight[s, p] @ m_{s,p} + gate_bias[s, p])            (B, H, head_dim)

so the connection s <- p can be driven by a third stream (gating="peer"). gating="self" uses
d_s alone, gating="static" a learned gate per pair/head/channel, gating=None no gate.

Initialisation (a documented choice): gate_weight, gate_bias, static gate logits and peer_bias
start at zero, so a fresh block computes exactly plain joint attention over all streams with
every value scaled by sigmoid(0) = 0.5 (a constant the output projection absorbs) and no
log-prior on any peer. The gates become input-dependent after the first update of gate_weight
(zero-initialising the last layer of a branch keeps the start neutral, as in ReZero/ControlNet).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..api import peer_attention

GATING_MODES = ("peer", "self", "static", None)
NORMALIZE_MODES = ("joint", "peer")


def _check_peers(peers, num_streams: int):
    """peers as a tuple of tuples of bools, or None for 'every stream attends to every stream'."""
    if peers is None:
        return None
    if isinstance(peers, Tensor):
        peers = peers.tolist()
    rows = tuple(tuple(bool(x) for x in row) for row in peers)
    if len(rows) != num_streams or any(len(row) != num_streams for row in rows):
        raise ValueError(f"peers: expected a {num_streams}x{num_streams} table, got {peers!r}")
    return rows


class PeerAttention(nn.Module):
    """Multi-stream attention with learned peer gates (SPEC section 6).

    Args:
        dims: width of each stream's tokens; S = len(dims).
        num_heads: attention heads (shared by all streams).
        head_dim: per-head width; default min(dims) // num_heads.
        peers: S x S bools, peers[s][p] = stream s attends to stream p (default: all).
        normalize: "joint" (one softmax over the keys of all attended peers) or "peer" (one
            softmax per peer, then the gated sum); see peer_attention.peer_attention.
        gating: "peer" (gates from a learned mix of all streams' descriptors), "self" (from
            stream s's own descriptor), "static" (a learned constant per pair/head/channel)
            or None (no gate).
        peer_bias: learn a per-pair, per-head log-prior added to the scores (joint mode only;
            with normalize="peer" it would cancel, so that combination is a ValueError).
        qkv_bias: bias of the q/k/v projections.
        is_causal: top-left causal mask on the self pairs (s attends to its own past only).
        dropout: dropout on the attention output, i.e. on the input of each stream's output
            projection (the fused kernel has no dropout on attention weights for S > 1).
    """

    def __init__(self, dims: Sequence[int], num_heads: int, head_dim: Optional[int] = None,
                 peers=None, normalize: str = "joint", gating: Optional[str] = "peer",
                 peer_bias: bool = True, qkv_bias: bool = True, is_causal: bool = False,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if not dims or any(d <= 0 for d in dims):
            raise ValueError(f"dims: expected one positive width per stream, got {dims}")
        if num_heads <= 0:
            raise ValueError(f"num_heads: expected a positive int, got {num_heads}")
        if head_dim is None:
            head_dim = min(dims) // num_heads
        if head_dim <= 0:
            raise ValueError(
                f"head_dim: expected a positive int, got {head_dim} "
                f"(min(dims)={min(dims)} // num_heads={num_heads}); pass head_dim explicitly")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize: expected 'joint' or 'peer', got {normalize!r}")
        if gating not in GATING_MODES:
            raise ValueError(f"gating: expected one of {GATING_MODES}, got {gating!r}")
        if peer_bias and normalize == "peer":
            raise ValueError("peer_bias: a per-peer log-prior cancels with normalize='peer'; "
                             "pass peer_bias=False or normalize='joint'")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        num_streams = len(dims)
        inner = num_heads * head_dim
        self.dims, self.num_streams, self.num_heads, self.head_dim = dims, num_streams, num_heads, head_dim
        self.peers = _check_peers(peers, num_streams)
        self.normalize, self.gating, self.is_causal = normalize, gating, is_causal

        self.q_proj = nn.ModuleList(nn.Linear(d, inner, bias=qkv_bias, **factory) for d in dims)
        self.k_proj = nn.ModuleList(nn.Linear(d, inner, bias=qkv_bias, **factory) for d in dims)
        self.v_proj = nn.ModuleList(nn.Linear(d, inner, bias=qkv_bias, **factory) for d in dims)
        self.out_proj = nn.ModuleList(nn.Linear(inner, d, **factory) for d in dims)
        self.dropout = nn.Dropout(dropout)

        if gating in ("peer", "self"):
            # descriptors share the width D = num_heads * head_dim
            self.descriptor_proj = nn.ModuleList(nn.Linear(d, inner, **factory) for d in dims)
            self.gate_weight = nn.Parameter(torch.zeros(num_streams, num_streams, inner, inner, **factory))
            self.gate_bias = nn.Parameter(torch.zeros(num_streams, num_streams, inner, **factory))
        if gating == "peer":
            # uniform mix at the start: every pair first sees the average of all descriptors
            self.mix_logits = nn.Parameter(torch.zeros(num_streams, num_streams, num_streams, **factory))
        if gating == "static":
            self.gate_logits = nn.Parameter(
                torch.zeros(num_streams, num_streams, num_heads, head_dim, **factory))
        self.peer_bias = (nn.Parameter(torch.zeros(num_streams, num_streams, num_heads, **factory))
                          if peer_bias else None)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"normalize={self.normalize!r}, gating={self.gating!r}, is_causal={self.is_causal}")

    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, xs) -> List[Tensor]:
        if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs: expected a list or tuple of {self.num_streams} tensors, "
                            f"got {type(xs).__name__}")
        xs = list(xs)
        if len(xs) != self.num_streams:
            raise ValueError(f"xs: expected {self.num_streams} streams, got {len(xs)}")
        batch = xs[0].shape[0] if xs[0].dim() == 3 else None
        for s, (x, width) in enumerate(zip(xs, self.dims)):
            if x.dim() != 3 or x.shape[0] != batch or x.shape[2] != width:
                raise ValueError(f"xs[{s}]: expected (B={batch}, L, {width}), got {tuple(x.shape)}")
        return xs

    def _split_heads(self, t: Tensor) -> Tensor:  # (B, L, H*hd) -> (B, H, L, hd)
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _descriptors(self, xs: List[Tensor], kv_lengths: Optional[Tensor]) -> Tensor:
        """(B, S, D): each stream's mean over its valid tokens, projected to the common width."""
        descriptors = []
        for s, x in enumerate(xs):
            length = x.shape[1]
            if kv_lengths is None:
                pooled = x.sum(1) / max(length, 1)
            else:
                valid = torch.arange(length, device=x.device) < kv_lengths[:, s, None].to(x.device)
                count = valid.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
                pooled = (valid.to(x.dtype) / count).unsqueeze(1).bmm(x).squeeze(1)
            descriptors.append(self.descriptor_proj[s](pooled))
        return torch.stack(descriptors, dim=1)

    def compute_gates(self, xs: List[Tensor], kv_lengths: Optional[Tensor] = None) -> Optional[Tensor]:
        """Gates (B or 1, S, S, num_heads, head_dim) for the streams xs, or None (gating=None)."""
        n, h, hd = self.num_streams, self.num_heads, self.head_dim
        if self.gating is None:
            return None
        if self.gating == "static":
            return torch.sigmoid(self.gate_logits).unsqueeze(0)
        descriptors = self._descriptors(xs, kv_lengths)
        if self.gating == "peer":
            mix = torch.softmax(self.mix_logits, dim=-1)  # (S, S, S): pair (s, p) over streams q
            mixed = torch.einsum("spq,bqd->bspd", mix, descriptors)
            logits = torch.einsum("bspd,spcd->bspc", mixed, self.gate_weight)
        else:  # "self": the connection s <- p is weighted from stream s's own descriptor
            logits = torch.einsum("bsd,spcd->bspc", descriptors, self.gate_weight)
        gates = torch.sigmoid(logits + self.gate_bias)
        return gates.unflatten(-1, (h, hd))

    def forward(self, xs: Sequence[Tensor], kv_lengths: Optional[Tensor] = None,
                return_gates: bool = False):
        """xs: S tensors (B, L_s, dims[s]); kv_lengths: optional int (B, S), tokens at positions
        >= kv_lengths[b, s] of stream s are padding (ignored as keys and in the gate pooling).

        Returns S tensors (B, L_s, dims[s]); with return_gates=True, (outputs, gates) where gates
        is (B, S, S, num_heads, head_dim) (None for gating=None); gates of pairs that peers
        leaves out are computed but unused.
        """
        xs = self._check_inputs(xs)
        queries = [self._split_heads(self.q_proj[s](x)) for s, x in enumerate(xs)]
        keys = [self._split_heads(self.k_proj[s](x)) for s, x in enumerate(xs)]
        values = [self._split_heads(self.v_proj[s](x)) for s, x in enumerate(xs)]
        gates = self.compute_gates(xs, kv_lengths)
        bias = None if self.peer_bias is None else self.peer_bias.unsqueeze(0)
        peers = None if self.peers is None else [list(row) for row in self.peers]
        attended = peer_attention(queries, keys, values, peers=peers, gate=gates, bias=bias,
                                  normalize=self.normalize, is_causal=self.is_causal,
                                  kv_lengths=kv_lengths)
        outputs = [
            self.out_proj[s](self.dropout(o.transpose(1, 2).flatten(2)))
            for s, o in enumerate(attended)
        ]
        if not return_gates:
            return outputs
        if gates is not None:
            batch = xs[0].shape[0]
            gates = gates.expand(batch, -1, -1, -1, -1)
        return outputs, gates
