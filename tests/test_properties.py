"""Property tests (hypothesis): random shapes and options through the public API (reference
backend) against two independent computations: torch's SDPA per stream/pair (tests.independent)
and an explicit loop over query rows written straight from SPEC section 3."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peer_attention as pa
from tests.independent import peer_attention_via_sdpa

F64 = torch.float64
ATOL = 1e-9
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def broadcast_shape(draw, full):
    """A shape that broadcasts to `full`: some leading dims dropped, some dims set to 1."""
    dropped = draw(st.integers(0, len(full)))
    return tuple(n if draw(st.booleans()) else 1 for n in full[dropped:])


@st.composite
def peer_problems(draw):
    num_streams = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from([1, 2]))
    q_heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim, value_dim = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    lens = st.lists(st.integers(0, 6), min_size=num_streams, max_size=num_streams)
    q_lens, kv_lens = draw(lens), draw(lens)
    normalize = draw(st.sampled_from(["joint", "peer"]))
    peers = None
    if draw(st.booleans()):
        peers = [[draw(st.booleans()) for _ in range(num_streams)] for _ in range(num_streams)]
    gate_shape = bias_shape = None
    if draw(st.booleans()):
        gate_shape = broadcast_shape(draw, (batch, num_streams, num_streams, q_heads, value_dim))
    if normalize == "joint" and draw(st.booleans()):
        bias_shape = broadcast_shape(draw, (batch, num_streams, num_streams, q_heads))
    kv_lengths = None
    if draw(st.booleans()):
        kv_lengths = [[draw(st.integers(0, m)) for m in kv_lens] for _ in range(batch)]
    return dict(
        batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim,
        q_lens=q_lens, kv_lens=kv_lens, normalize=normalize, peers=peers, gate_shape=gate_shape,
        bias_shape=bias_shape, kv_lengths=kv_lengths, is_causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.1, 2.0))), seed=draw(st.integers(0, 2**16)),
    )


def build(spec):
    gen = torch.Generator().manual_seed(spec["seed"])

    def rnd(*shape):
        return torch.randn(shape, dtype=F64, generator=gen).requires_grad_()

    b, hq, h = spec["batch"], spec["q_heads"], spec["kv_heads"]
    queries = [rnd(b, hq, n, spec["head_dim"]) for n in spec["q_lens"]]
    keys = [rnd(b, h, m, spec["head_dim"]) for m in spec["kv_lens"]]
    values = [rnd(b, h, m, spec["value_dim"]) for m in spec["kv_lens"]]
    kwargs = dict(peers=spec["peers"], normalize=spec["normalize"], is_causal=spec["is_causal"],
                  scale=spec["scale"])
    if spec["gate_shape"] is not None:
        kwargs["gate"] = rnd(*spec["gate_shape"])
    if spec["bias_shape"] is not None:
        kwargs["bias"] = rnd(*spec["bias_shape"])
    if spec["kv_lengths"] is not None:
        kwargs["kv_lengths"] = torch.tensor(spec["kv_lengths"], dtype=torch.int64)
    return queries, keys, values, kwargs


def explicit_loops(queries, keys, values, *, peers, gate, bias, normalize, is_causal, kv_lengths,
                   scale):
    """SPEC section 3, one query row at a time."""
    num_streams = len(queries)
    batch, q_heads, _, head_dim = queries[0].shape
    kv_heads, value_dim = keys[0].shape[1], values[0].shape[-1]
    group = q_heads // kv_heads
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    gate = None if gate is None else gate.detach().expand(batch, num_streams, num_streams,
                                                          q_heads, value_dim)
    bias = None if bias is None else bias.detach().expand(batch, num_streams, num_streams, q_heads)
    outputs = []
    for s, q in enumerate(queries):
        out = torch.zeros(batch, q_heads, q.shape[2], value_dim, dtype=F64)
        for b in range(batch):
            for hd in range(q_heads):
                for i in range(q.shape[2]):
                    per_peer = []  # (scores, gated values) of each attended peer
                    for p in range(num_streams):
                        if peers is not None and not peers[s][p]:
                            continue
                        scores, vals = [], []
                        for j in range(keys[p].shape[2]):
                            if is_causal and s == p and j > i:
                                continue
                            if kv_lengths is not None and j >= kv_lengths[b][p]:
                                continue
                            z = scale * float(q[b, hd, i].detach() @ keys[p][b, hd // group, j].detach())
                            if bias is not None:
                                z += float(bias[b, s, p, hd])
                            v = values[p][b, hd // group, j].detach()
                            if gate is not None:
                                v = v * gate[b, s, p, hd]
                            scores.append(z)
                            vals.append(v)
                        per_peer.append((scores, vals))
                    groups = per_peer if normalize == "peer" else [
                        ([z for sc, _ in per_peer for z in sc], [v for _, vs in per_peer for v in vs])]
                    for scores, vals in groups:
                        if not scores:
                            continue
                        top = max(scores)
                        weights = [math.exp(z - top) for z in scores]
                        total = sum(weights)
                        for w, v in zip(weights, vals):
                            out[b, hd, i] += w / total * v
        outputs.append(out)
    return outputs


@SETTINGS
@given(peer_problems())
def test_peer_attention_matches_explicit_loops(spec):
    queries, keys, values, kwargs = build(spec)
    outs = pa.peer_attention(queries, keys, values, enable_gqa=True, backend="reference", **kwargs)
    loops_kwargs = dict(kwargs, gate=kwargs.get("gate"), bias=kwargs.get("bias"),
                        kv_lengths=spec["kv_lengths"])
    want = explicit_loops(queries, keys, values, **loops_kwargs)
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        assert o.shape == w.shape and o.dtype == F64
        torch.testing.assert_close(o.detach(), w, atol=ATOL, rtol=0)


def grads_or_zeros(outputs, leaves, grad_outputs):
    """Gradients of the outputs w.r.t. the leaves; an output built without any leaf (e.g. the
    zeros of a stream with no peers) contributes nothing."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return [None] * len(leaves)
    return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                               allow_unused=True)


@SETTINGS
@given(peer_problems())
def test_peer_attention_matches_sdpa_route_with_grads(spec):
    queries, keys, values, kwargs = build(spec)
    leaves = [*queries, *keys, *values] + [kwargs[n] for n in ("gate", "bias") if n in kwargs]
    outs = pa.peer_attention(queries, keys, values, enable_gqa=True, backend="reference", **kwargs)
    want = peer_attention_via_sdpa(queries, keys, values, **kwargs)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    grad_outs = [torch.randn(w.shape, dtype=F64, generator=gen) for w in want]
    grads = grads_or_zeros(outs, leaves, grad_outs)
    want_grads = grads_or_zeros(want, leaves, grad_outs)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o.detach(), w.detach(), atol=ATOL, rtol=0)
    for leaf, g, w in zip(leaves, grads, want_grads):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        assert g.shape == leaf.shape and not g.isnan().any()
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


@st.composite
def sdpa_problems(draw):
    lead = tuple(draw(st.lists(st.integers(1, 2), min_size=0, max_size=2)))
    kv_heads = draw(st.sampled_from([1, 2]))
    q_heads = kv_heads * draw(st.sampled_from([1, 2]))
    q_len, kv_len = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    head_dim, value_dim = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    mask_kind = draw(st.sampled_from([None, "bool", "float", "causal"]))
    mask_shape = broadcast_shape(draw, lead + (q_heads, q_len, kv_len))
    return dict(lead=lead, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
                head_dim=head_dim, value_dim=value_dim, mask_kind=mask_kind,
                mask_shape=mask_shape, scale=draw(st.one_of(st.none(), st.floats(0.1, 2.0))),
                seed=draw(st.integers(0, 2**16)))


@SETTINGS
@given(sdpa_problems())
def test_sdpa_matches_torch(spec):
    gen = torch.Generator().manual_seed(spec["seed"])

    def rnd(*shape):
        return torch.randn(shape, dtype=F64, generator=gen).requires_grad_()

    lead = spec["lead"]
    q = rnd(*lead, spec["q_heads"], spec["q_len"], spec["head_dim"])
    k = rnd(*lead, spec["kv_heads"], spec["kv_len"], spec["head_dim"])
    v = rnd(*lead, spec["kv_heads"], spec["kv_len"], spec["value_dim"])
    kwargs = dict(scale=spec["scale"], enable_gqa=True)
    leaves = [q, k, v]
    if spec["mask_kind"] == "causal":
        kwargs["is_causal"] = True
    elif spec["mask_kind"] == "bool":
        kwargs["attn_mask"] = torch.rand(spec["mask_shape"], generator=gen) > 0.3
    elif spec["mask_kind"] == "float":
        kwargs["attn_mask"] = rnd(*spec["mask_shape"])
        leaves.append(kwargs["attn_mask"])
    out = pa.scaled_dot_product_attention(q, k, v, backend="reference", **kwargs)
    if "attn_mask" in kwargs:  # torch wants at least a 2-d mask: give it the full shape
        kwargs["attn_mask"] = kwargs["attn_mask"].expand(
            *lead, spec["q_heads"], spec["q_len"], spec["kv_len"])
    if len(lead) == 0 and spec["q_heads"] != spec["kv_heads"]:
        # torch's own GQA needs a batch dim; compare with the key/value heads repeated
        group = spec["q_heads"] // spec["kv_heads"]
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(group, -3),
                                              v.repeat_interleave(group, -3), **kwargs)
    else:
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.shape == want.shape
    torch.testing.assert_close(out.detach(), want.detach(), atol=ATOL, rtol=0)
    if out.numel():
        grad_out = torch.randn(out.shape, dtype=F64, generator=gen)
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
        want_grads = torch.autograd.grad(want, leaves, grad_out, allow_unused=True)
        for leaf, g, w in zip(leaves, grads, want_grads):
            g = torch.zeros_like(leaf) if g is None else g
            w = torch.zeros_like(leaf) if w is None else w
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
