"""The context-parallel cases every spawned group runs, each against the one-process call.

A case is a name and its options; `build_inputs` makes the full (unsharded) float64 tensors from
a seed, identical on every rank. Lengths are multiples of 2W so that both layouts apply, and the
head counts (Hq = 2W, H = W: GQA) divide W so that Ulysses applies.
"""
from __future__ import annotations

import itertools
import os

import torch

# local kernels to run the cases with (float64 on the CPU): the reference by default; add others
# with PEER_ATTENTION_CP_TEST_BACKENDS=reference,torch
BACKENDS = tuple(os.environ.get("PEER_ATTENTION_CP_TEST_BACKENDS", "reference").split(","))

METHOD_LAYOUTS = (("ring", "contiguous"), ("ring", "zigzag"), ("ulysses", "contiguous"),
                  ("ulysses", "zigzag"))

SDPA_OPTIONS = {
    "causal": dict(is_causal=True),
    "gqa_causal": dict(is_causal=True, enable_gqa=True),
    # S = 2 L, tensors laid out (B, L, H, E) and transposed: non-contiguous shards
    "cross_lengths": dict(is_causal=False, kv_factor=2, transposed=True),
}

PEER_OPTIONS = {
    # joint: gate and bias with broadcast shapes and gradients, kv_lengths, sparse peers, causal
    "joint_all": dict(normalize="joint", gate=True, bias=True, kv_lengths=True, sparse=True,
                      is_causal=True),
    "joint_gqa_gate": dict(normalize="joint", gate=True, enable_gqa=True),
    "peer_all": dict(normalize="peer", gate=True, kv_lengths=True, sparse=True, is_causal=True),
    "peer_plain": dict(normalize="peer", enable_gqa=True),
}


def all_cases():
    cases = {}
    for (method, layout), (name, opts) in itertools.product(METHOD_LAYOUTS, SDPA_OPTIONS.items()):
        cases[f"sdpa-{name}-{method}-{layout}"] = dict(kind="sdpa", method=method, layout=layout,
                                                       **opts)
    for (method, layout), (name, opts) in itertools.product(METHOD_LAYOUTS, PEER_OPTIONS.items()):
        cases[f"peer-{name}-{method}-{layout}"] = dict(kind="peer", method=method, layout=layout,
                                                       **opts)
    return cases


CASES = all_cases()
ERROR_CASES = ("uneven_shards", "ulysses_heads", "zigzag_odd", "causal_lengths")
TOLERANCE = 1e-10  # float64, same reference math, only the merge order differs


def build_inputs(case: dict, world: int, seed: int):
    """Full float64 tensors and options of a case (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    gqa = case.get("enable_gqa", False)
    batch, q_heads, e_dim, v_dim = 2, 2 * world, 4, 3
    kv_heads = world if gqa else q_heads

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if case["kind"] == "sdpa":
        length = 4 * world
        kv_length = length * case.get("kv_factor", 1)
        shapes = [(batch, q_heads, length, e_dim), (batch, kv_heads, kv_length, e_dim),
                  (batch, kv_heads, kv_length, v_dim)]
        if case.get("transposed"):
            tensors = [rand(b, n, h, d).transpose(1, 2) for b, h, n, d in shapes]
        else:
            tensors = [rand(*shape) for shape in shapes]
        options = dict(is_causal=case["is_causal"], enable_gqa=gqa)
        return tensors, options
    lengths = (2 * world, 4 * world, 2 * world)
    num = len(lengths)
    queries = [rand(batch, q_heads, n, e_dim) for n in lengths]
    keys = [rand(batch, kv_heads, n, e_dim) for n in lengths]
    values = [rand(batch, kv_heads, n, v_dim) for n in lengths]
    options = dict(normalize=case["normalize"], is_causal=case.get("is_causal", False),
                   enable_gqa=gqa)
    if case.get("gate"):
        options["gate"] = rand(num, num, 1, v_dim).sigmoid()  # broadcast over batch and heads
    if case.get("bias"):
        options["bias"] = rand(batch, num, num, q_heads)
    if case.get("kv_lengths"):
        options["kv_lengths"] = torch.tensor([[lengths[0], 0, lengths[2] - 3],
                                              [1, lengths[1] - world - 1, lengths[2]]])
    if case.get("sparse"):
        options["peers"] = [[True, True, False], [False, True, True], [True, False, False]]
    return (queries, keys, values), options
