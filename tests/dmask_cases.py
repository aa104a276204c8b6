"""Shared cases of the float-mask gradient at the mask's own shape (issue 23): a mask broadcast
over batch, heads or queries, with GQA, causal and kv_lengths, on any backend and device."""
from __future__ import annotations

import contextlib

import torch

from peer_attention import entry
from peer_attention.api import peer_problem
from tests.helpers import TEST_DEVICE, randn

B, HQ, H, TQ, TK, E = 2, 4, 2, 13, 21, 16  # GQA (2 query heads per key/value head)
MASK_SHAPES = [(TQ, TK), (1, 1, TQ, TK), (B, 1, TQ, TK), (1, HQ, TQ, TK), (B, HQ, TQ, TK),
               (B, 1, 1, TK), (1, HQ, 1, TK)]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


@contextlib.contextmanager
def deterministic(on: bool):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def attention(backend, is_causal=False, kv_lengths=None, sizes=(B, HQ, TQ, TK)):
    """fn(q, k, v, mask) -> out of backend `backend`, the mask expand()ed to (B, Hq, Tq, Tk) as
    the public API does (so autograd sums its gradient back to the mask's shape)."""
    def fn(q, k, v, mask):
        problem = peer_problem([q], [k], [v], is_causal=is_causal, enable_gqa=True,
                               kv_lengths=None if kv_lengths is None else kv_lengths.to(q.device))
        problem = problem._replace(attn_mask=mask.expand(sizes))
        return entry.run(problem, backend)[0]
    return fn


def inputs(shape, seed=0, device=None, sizes=(B, HQ, H, TQ, TK, E)):
    """float64 q, k, v and a mask of `shape`, requiring grad."""
    batch, q_heads, kv_heads, q_len, kv_len, dim = sizes
    gen = torch.Generator().manual_seed(seed)
    made = [randn(batch, q_heads, q_len, dim, gen=gen), randn(batch, kv_heads, kv_len, dim, gen=gen),
            randn(batch, kv_heads, kv_len, dim, gen=gen), randn(*shape, gen=gen)]
    return [t.detach().to(device or DEVICE).requires_grad_() for t in made]


# where the suites written with CPU tensors run (scripts/gpu_check.sh: PEER_ATTENTION_TEST_DEVICE)
DEVICE = TEST_DEVICE or "cpu"
KV_LENGTHS = torch.tensor([[TK], [TK - 6]], dtype=torch.int32)  # padding keys in batch 1
