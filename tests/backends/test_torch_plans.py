"""The `torch` backend's two plans for peer attention (issue 20, item 4): which one a call takes,
both exact (forward and every gradient, each plan forced), and the backward not running the pair
forwards again when the forward kept them. No timing here: bench --preset cpu measures the plans."""
import pytest
import torch

import peer_attention as pa
from peer_attention.api import peer_problem
from peer_attention.backends import torch_backend, torch_fused
from peer_attention.backends.torch_fused import FUSED, PAIRS, forced_plan
from tests.helpers import assert_matches_reference

from .cases import FEATURES, feature_id, peer_case


def _problem(lens=(5, 9), heads=2, kv_heads=2, dtype=torch.float32, gate=False, bias=False,
             **kw):
    qs = [torch.randn(1, heads, n, 8, dtype=dtype) for n in lens]
    ks = [torch.randn(1, kv_heads, n, 8, dtype=dtype) for n in lens]
    vs = [torch.randn(1, kv_heads, n, 8, dtype=dtype) for n in lens]
    s = len(lens)
    return peer_problem(qs, ks, vs, gate=torch.rand(1, s, s, heads, 8) if gate else None,
                        bias=torch.randn(1, s, s, heads) if bias else None,
                        enable_gqa=heads != kv_heads, **kw)


def test_plan_rule():
    """One call on the packed streams when nothing differs per pair; fused per query stream for
    gates, biases, kv_lengths, sparse tables and short causal streams; pairs for the per-peer
    softmax, 16-bit gates, gates with GQA and long causal streams."""
    assert torch_backend.is_one_call(_problem())
    assert torch_backend.is_one_call(_problem((5, 0, 3)))
    assert not torch_backend.is_one_call(_problem(gate=True))
    assert torch_fused.plan(_problem(gate=True, bias=True)) == FUSED
    def grad_bias(lens=(5, 9), **kw):
        p = _problem(lens, bias=True, **kw)
        return p._replace(bias=p.bias.requires_grad_())
    # a bias that requires grad: fused (dbias through a key column) for short float32/64 query
    # streams with a finite bias and no GQA; pairs otherwise
    assert torch_fused.plan(grad_bias()) == FUSED
    assert torch_fused.plan(grad_bias((torch_fused.BIAS_GRAD_FUSED_MAX_QUERIES + 1, 4))) == PAIRS
    assert torch_fused.plan(grad_bias(dtype=torch.bfloat16)) == PAIRS
    assert torch_fused.plan(grad_bias(heads=4, kv_heads=2)) == PAIRS
    assert torch_fused.plan(_problem(kv_lengths=torch.tensor([[3, 4]]))) == FUSED
    assert torch_fused.plan(_problem(peers=[[1, 1], [0, 1]])) == FUSED
    assert torch_fused.plan(_problem(is_causal=True, gate=True)) == FUSED
    long = torch_fused.CAUSAL_FUSED_MAX_QUERIES + 1
    assert torch_fused.plan(_problem((long, 4), is_causal=True, gate=True)) == PAIRS
    assert torch_fused.plan(_problem(normalize="peer", gate=True)) == PAIRS
    assert torch_fused.plan(_problem(dtype=torch.bfloat16, gate=True)) == PAIRS
    assert torch_fused.plan(_problem(heads=4, kv_heads=2, gate=True)) == PAIRS
    assert torch_fused.plan(_problem(heads=4, kv_heads=2, bias=True)) == FUSED
    with forced_plan(PAIRS):
        assert torch_fused.plan(_problem(gate=True)) == PAIRS
        assert not torch_backend.is_one_call(_problem())
    with forced_plan(FUSED):
        assert torch_fused.plan(_problem((long, 4), is_causal=True)) == FUSED
        assert torch_fused.plan(_problem(normalize="peer")) == PAIRS  # fused cannot serve it
    with pytest.raises(ValueError, match="forced_plan"):
        with forced_plan("both"):
            pass


JOINT_FEATURES = [f for f in FEATURES if f["normalize"] == "joint"]


@pytest.mark.parametrize("plan", [PAIRS, FUSED])
@pytest.mark.parametrize("features", JOINT_FEATURES, ids=feature_id)
def test_both_plans_exact(features, plan):
    """Each plan forced, every joint feature combination on three streams (a zero-length one, a
    sparse table): float64 outputs and gradients (gate and bias included) to 1e-12."""
    f = features
    case = dict(q_lens=[5, 9, 0], kv_lens=[7, 4, 3], q_heads=2, kv_heads=1 if f["gqa"] else 2,
                peers=[[1, 1, 0], [1, 1, 1], [0, 1, 1]], is_causal=f["is_causal"],
                gate_shape=(1, 3, 3, 2, 12) if f["gate"] else None,
                bias_shape=(1, 3, 3, 2) if f["bias"] else None,
                kv_lengths=torch.tensor([[3, 4, 0]]) if f["kv_lengths"] else None)
    kernel_fn, reference_fn, inputs, names = peer_case("torch", **case)
    with forced_plan(plan):
        assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float64, names=names,
                                 float32_atol=1e-12)


@pytest.mark.parametrize("plan", [PAIRS, FUSED])
def test_both_plans_float32_dense(plan):
    """The packed one-call case and the dense gate + bias case in float32 (SPEC section 8)."""
    for gate, bias in ((None, None), ((1, 2, 2, 2, 12), (1, 2, 2, 2))):
        kernel_fn, reference_fn, inputs, names = peer_case(
            "torch", q_lens=[6, 11], kv_lens=[6, 11], gate_shape=gate, bias_shape=bias)
        with forced_plan(plan):
            assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)


@pytest.mark.parametrize("normalize,bias", [("peer", None), ("joint", (1, 2, 2, 2))])
def test_backward_reuses_the_forwards_pair_outputs(monkeypatch, normalize, bias):
    """Per-peer softmax (and joint with a bias gradient, pairs forced): the eager backward uses
    the pair outputs its forward kept, as the composition's autograd does, with the same numbers."""
    kernel_fn, reference_fn, inputs, names = peer_case(
        "torch", q_lens=[5, 9], kv_lens=[7, 4], gate_shape=(1, 2, 2, 2, 12), bias_shape=bias,
        normalize=normalize)
    with forced_plan(PAIRS):  # a short joint call with a bias gradient is fused otherwise
        outs = kernel_fn(*inputs)
        calls = []
        original = torch_backend.PairPlan.pair
        monkeypatch.setattr(torch_backend.PairPlan, "pair",
                            lambda self, *a, **k: calls.append(a[:2]) or original(self, *a, **k))
        grads = torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
    assert calls == []
    want = torch.autograd.grad(reference_fn(*inputs), inputs, [torch.ones_like(o) for o in outs])
    for name, g, w in zip(names, grads, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0, msg=name)


WAN_PEERS = [[0, 1, 1], [0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("normalize", ["peer", "joint"])
@pytest.mark.parametrize("gate", [None, (1, 3, 3, 2, 12)], ids=["no-gate", "gate"])
def test_lone_query_stream_over_key_only_streams(gate, normalize, dtype):
    """Wan's layout: queries in one stream only, over two streams that only hold keys. The merge
    writes the packed output itself and the lone stream's q gradient skips the cat with the empty
    streams (issue 20): same numbers and every gradient as the reference."""
    kernel_fn, reference_fn, inputs, names = peer_case(
        "torch", q_lens=[6, 0, 0], kv_lens=[0, 7, 5], peers=WAN_PEERS, gate_shape=gate,
        normalize=normalize)
    extra = dict(float32_atol=1e-12) if dtype == torch.float64 else {}
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names, **extra)


def test_lone_query_stream_through_the_registered_op():
    """The op path (not the eager shortcut) returns the layouts its fake kernel declares."""
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    problem = peer_problem([q, q[:, :, :0], q[:, :, :0]],
                           [k[:, :, :0], k[:, :, :7], k[:, :, 7:]],
                           [v[:, :, :0], v[:, :, :7], v[:, :, 7:]], peers=WAN_PEERS,
                           normalize="peer")
    torch.library.opcheck(torch.ops.peer_attention.torch_fwd.default, tuple(problem))
    out, lse = torch_backend._forward(problem)
    assert out.is_contiguous() and out.shape == (1, 2, 6, 8)
    grads = torch_backend._backward(problem, torch.randn_like(out), out, lse, [True] * 3 + [False] * 4)
    assert grads[0].shape == q.shape and grads[1].shape == k.shape


def test_fused_backward_reuses_the_forwards_gated_values(monkeypatch):
    """Fused plan with a gate: the eager backward takes the g * v its forward built (as the
    composition's autograd saves its product), with the same gradients."""
    kernel_fn, reference_fn, inputs, names = peer_case(
        "torch", q_lens=[5, 9], kv_lens=[7, 4], gate_shape=(1, 2, 2, 2, 12), bias_shape=(1, 2, 2, 2))
    inputs[-1] = inputs[-1].detach()  # a bias without gradient: the fused plan serves it
    with forced_plan(FUSED):
        outs = kernel_fn(*inputs)
        calls = []
        original = torch_fused.QueryStreams.values
        monkeypatch.setattr(torch_fused.QueryStreams, "values",
                            lambda self, *a: calls.append(a[0]) or original(self, *a))
        wanted = inputs[:-1]
        grads = torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs])
    assert calls == []
    want = torch.autograd.grad(reference_fn(*inputs), wanted, [torch.ones_like(o) for o in outs])
    for name, g, w in zip(names, grads, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_plan_marks_rows_that_a_minus_inf_bias_empties(causal):
    """The fused plan checks for empty rows only when a row can be empty (kv_lengths padding or
    a -inf bias; issue 20): a bias of -inf on every pair of stream 0 empties its rows (out 0, lse
    -inf, as the reference), a finite bias with a causal self block empties none."""
    problem = _problem((5, 9, 3), gate=True, bias=True, is_causal=causal)
    bias = problem.bias.clone()
    bias[:, 0] = float("-inf")
    for p in (problem, problem._replace(bias=bias)):
        assert torch_fused.plan(p) == FUSED
        out, lse = torch_backend.TorchBackend().forward(p)
        want_out, want_lse = pa.dispatch.BACKENDS["reference"].forward(p)
        torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse.to(lse.dtype), atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[:, :, :5]).all() and (out[:, :, :5] == 0).all()


def test_a_lone_filled_stream_is_packed_without_a_copy():
    """Wan's layout (video queries beside empty text/image query streams): the problem's q is the
    caller's video tensor itself, or an alias of it when an empty stream requires grad (which
    still gets its empty gradient); the video's output is the op's output itself, not a split
    whose backward would concatenate its gradient with empty ones (issue 20: no copy the
    composition does not make)."""
    video = torch.randn(1, 2, 6, 8, requires_grad=True)
    empty = torch.zeros(1, 2, 0, 8)
    keys = [torch.randn(1, 2, n, 8) for n in (0, 3, 4)]
    values = [torch.randn(1, 2, n, 8) for n in (0, 3, 4)]
    peers = [[0, 1, 1], [0, 0, 0], [0, 0, 0]]
    problem = peer_problem([video, empty, empty], keys, values, peers=peers, normalize="peer")
    assert problem.q is video
    assert problem.k.shape[2] == 7  # two filled key streams: packed
    want = pa.peer_attention([video, empty, empty], keys, values, peers=peers, normalize="peer",
                             backend="reference")[0]
    got = pa.peer_attention([video, empty, empty], keys, values, peers=peers, normalize="peer")[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (dvideo,) = torch.autograd.grad(got.sum(), video)
    (want_dvideo,) = torch.autograd.grad(want.sum(), video)
    torch.testing.assert_close(dvideo, want_dvideo, atol=1e-5, rtol=1e-5)
    empty_leaf = torch.zeros(1, 2, 0, 8, requires_grad=True)
    problem = peer_problem([video, empty_leaf, empty], keys, values, peers=peers, normalize="peer")
    assert problem.q is not video and problem.q.data_ptr() == video.data_ptr()  # an alias
    out = pa.peer_attention([video, empty_leaf, empty], keys, values, peers=peers,
                            normalize="peer")[0]
    grads = torch.autograd.grad(out.sum(), (video, empty_leaf))
    assert grads[1].shape == (1, 2, 0, 8)
    torch.testing.assert_close(grads[0], want_dvideo, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lone", [0, 2])
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_lone_stream_outputs_and_gradients(lone, normalize):
    """Every stream requires grad, one holds every query and two key streams hold the keys: the
    outputs (the lone one is the op's output itself, the others empty), every gradient (the empty
    streams' empty ones included) and the gradients of the gradients (create_graph) equal the
    reference's, float64."""
    def streams(lens, heads=2, dim=8):
        return [torch.randn(1, heads, n, dim, dtype=torch.float64, requires_grad=True)
                for n in lens]
    q_lens = [0, 0, 0]
    q_lens[lone] = 5
    queries, keys, values = streams(q_lens), streams((0, 3, 4)), streams((0, 3, 4))
    gate = torch.rand(1, 3, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    peers = [[0, 1, 1]] * 3
    inputs = queries + keys + values + [gate]
    grad_outs = [torch.randn(1, 2, n, 8, dtype=torch.float64) for n in q_lens]

    def run(backend):
        outs = pa.peer_attention(queries, keys, values, peers=peers, gate=gate,
                                 normalize=normalize, backend=backend)
        grads = torch.autograd.grad(outs, inputs, grad_outs, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), inputs,
                                     allow_unused=True, materialize_grads=True)
        return outs, grads, second

    outs, grads, second = run("torch")
    want_outs, want_grads, want_second = run("reference")
    assert type(outs[lone].grad_fn).__name__ == "LoneOutputBackward"
    for got, want in zip(outs + list(grads) + list(second),
                         want_outs + list(want_grads) + list(want_second)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("minus_inf", [False, True], ids=["finite", "minus-inf"])
def test_fused_bias_gradient_through_a_key_column(monkeypatch, dtype, is_causal, minus_inf):
    """A bias that requires grad on short streams takes the fused plan: its backward passes the
    bias as one more key feature and reads dbias from dK's last column (issue 20). Gates,
    kv_lengths padding, a sparse table and an empty stream, a -inf bias on one pair (that pair
    hidden) and on every pair of stream 0 (its rows empty): every gradient as the reference's;
    the pair plan's forward never runs."""
    kernel_fn, reference_fn, inputs, names = peer_case(
        "torch", q_lens=[5, 9, 0], kv_lens=[7, 4, 3], peers=[[1, 1, 0], [1, 1, 1], [0, 1, 1]],
        gate_shape=(1, 3, 3, 2, 12), bias_shape=(1, 3, 3, 2), is_causal=is_causal,
        kv_lengths=torch.tensor([[3, 4, 0]]))
    if minus_inf:
        with torch.no_grad():
            inputs[-1][0, 1, 2] = float("-inf")
            inputs[-1][0, 0] = float("-inf")
    columns, pairs = [], []
    original = torch_fused.QueryStreams.with_bias_column
    monkeypatch.setattr(torch_fused.QueryStreams, "with_bias_column",
                        lambda self, *a: columns.append(a[0]) or original(self, *a))
    pair = torch_backend.PairPlan.pair
    monkeypatch.setattr(torch_backend.PairPlan, "pair",
                        lambda self, *a, **k: pairs.append(a[:2]) or pair(self, *a, **k))
    extra = dict(float32_atol=1e-12) if dtype == torch.float64 else {}
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names, **extra)
    assert columns and not pairs


@pytest.mark.parametrize("scale", [0.0, -0.3, 1e-9])
def test_bias_gradient_at_a_zero_negative_or_tiny_scale(monkeypatch, scale):
    """The key column holds bias / scale: a negative scale takes it (the same scores), a zero or
    vanishing one does not (a 0 * inf score); every gradient as the reference's."""
    kernel_fn, reference_fn, inputs, names = peer_case(
        "torch", q_lens=[5, 9], kv_lens=[7, 4], gate_shape=(1, 2, 2, 2, 12),
        bias_shape=(1, 2, 2, 2), scale=scale)
    columns = []
    original = torch_fused.QueryStreams.with_bias_column
    monkeypatch.setattr(torch_fused.QueryStreams, "with_bias_column",
                        lambda self, *a: columns.append(a[0]) or original(self, *a))
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float64, names=names,
                             float32_atol=1e-12)
    assert bool(columns) == (scale < 0)


@pytest.mark.parametrize("peers", [[[1, 1, 1], [1, 1, 0], [0, 1, 1]],
                                   [[1, 1, 0], [1, 1, 1], [1, 1, 1]]], ids=["dense-first", "dense-last"])
def test_fused_gradient_sums_in_any_order(peers):
    """The fused backward sums dK/dV of a query stream that attends every key stream in place
    into packed tensors and those of the others per stream: both orders (the packed sum first,
    or per-stream terms first), with gates and a bias gradient, float64 to 1e-12."""
    kernel_fn, reference_fn, inputs, names = peer_case(
        "torch", q_lens=[5, 9, 4], kv_lens=[7, 4, 3], peers=peers,
        gate_shape=(1, 3, 3, 2, 12), bias_shape=(1, 3, 3, 2))
    with forced_plan(FUSED):
        assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float64, names=names,
                                 float32_atol=1e-12)
