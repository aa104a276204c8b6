"""FLOP counts (MATH.md, "FLOP count used by the bench").

Forward, per attended stream pair (s, p): two matmuls, Q_s K_p^T (2*L_s*M_p*E FLOPs per batch
and query head) and P V_p (2*L_s*M_p*Ev), so

    forward  = sum over attended pairs (s, p) of 2 * B * Hq * L_s * M_p * (E + Ev)
               (= 4 * B * H * L * S * E for one stream with E == Ev)
    causal   : the self pairs (s == p) count half (only the lower triangle is computed)
    backward = 2.5 * forward   (five matmuls against the forward's two)
    fwd+bwd  = 3.5 * forward

Softmax, masks, gates and bias are not counted (they are O(L*M), not O(L*M*E)). Masks,
kv_lengths and dropout do not reduce the count: the figure is the dense-equivalent rate.
TFLOP/s = flops / (milliseconds * 1e-3) / 1e12.
"""
from __future__ import annotations

from typing import Iterable, Tuple

BACKWARD_FACTOR = 2.5
MODE_FACTOR = {"fwd": 1.0, "bwd": BACKWARD_FACTOR, "fwd+bwd": 1.0 + BACKWARD_FACTOR}


def pair_flops(batch: int, q_heads: int, q_len: int, kv_len: int, head_dim: int, value_dim: int,
               causal_self: bool = False) -> float:
    """Forward FLOPs of one stream pair: 2*B*Hq*L*M*(E+Ev), halved for a causal self pair."""
    flops = 2.0 * batch * q_heads * q_len * kv_len * (head_dim + value_dim)
    return flops / 2 if causal_self else flops


def forward_flops(batch: int, q_heads: int, q_lens, kv_lens, head_dim: int, value_dim: int,
                  pairs: Iterable[Tuple[int, int]], is_causal: bool = False) -> float:
    """Sum of pair_flops over the attended pairs (causal halving on the self pairs only)."""
    return sum(pair_flops(batch, q_heads, q_lens[s], kv_lens[p], head_dim, value_dim,
                          causal_self=is_causal and s == p) for s, p in pairs)


def case_flops(case, mode: str) -> float:
    """FLOPs of one call of `case` in `mode` ("fwd", "bwd" or "fwd+bwd")."""
    fwd = forward_flops(case.batch, case.q_heads, case.q_lens, case.kv_lens, case.head_dim,
                        case.value_dim, case.attended_pairs(), case.is_causal)
    return fwd * MODE_FACTOR[mode]


def tflops_per_s(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12
