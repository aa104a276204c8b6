"""backend="torch" (torch's fused SDPA kernels, composed): forward and backward of every feature
it claims against the reference under SPEC section 8, torch's dropout reproduced bit for bit,
auto picking it on the CPU, and its reasons for what it declines."""
import pytest
import torch
import torch.nn.functional as F

import peer_attention as pa
from peer_attention import dispatch
from peer_attention.api import peer_problem, sdpa_problem
from peer_attention.problem import AttentionProblem
from tests.helpers import assert_matches_reference, recorded_dispatch

from .cases import FEATURES, feature_id, peer_case, sdpa_case

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
G = torch.Generator().manual_seed(1)


def _float_mask_with_inf_rows():
    mask = torch.randn(1, 2, 5, 7, generator=G, dtype=torch.float64)
    mask[0, 0, 1] = float("-inf")  # a row with nothing to attend to
    mask[0, 1, :, 3] = float("-inf")
    return mask.requires_grad_()


SDPA = {
    "odd-sizes": dict(q_len=5, kv_len=7),
    "causal-L<M": dict(q_len=5, kv_len=23, is_causal=True),
    "causal-L>M": dict(q_len=23, kv_len=6, is_causal=True),
    "gqa": dict(q_len=9, kv_len=11, lead=(2, 4), kv_heads=2),
    "extra-lead-dims": dict(q_len=6, kv_len=5, lead=(2, 1, 2)),
    "value-dim-smaller": dict(q_len=4, kv_len=6, head_dim=24, value_dim=7),
    "value-dim-larger": dict(q_len=4, kv_len=6, head_dim=8, value_dim=20),
    "bool-mask-broadcast": dict(q_len=7, kv_len=18, mask=torch.rand(1, 1, 7, 18, generator=G) < 0.6),
    "bool-mask-gqa": dict(q_len=6, kv_len=9, lead=(2, 4), kv_heads=2,
                          mask=torch.rand(2, 4, 6, 9, generator=G) < 0.6),
    "float-mask-grad": dict(q_len=7, kv_len=9, lead=(2, 2),
                            mask=torch.randn(2, 2, 7, 9, generator=G, dtype=torch.float64).requires_grad_()),
    "float-mask-broadcast-grad": dict(q_len=6, kv_len=9, lead=(2, 2), value_dim=5,
                                      mask=torch.randn(2, 1, 1, 9, generator=G, dtype=torch.float64).requires_grad_()),
    "float-mask-with-masked-rows": dict(q_len=5, kv_len=7, mask=_float_mask_with_inf_rows()),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SDPA))
def test_sdpa_matches_reference(name, dtype):
    kernel_fn, reference_fn, inputs, names = sdpa_case("torch", **SDPA[name])
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)


def test_sdpa_float64_and_torchs_own_numbers():
    """float64 (the CPU kernel serves it) to 1e-12, and float32 to torch's own SDPA."""
    kernel_fn, reference_fn, inputs, names = sdpa_case("torch", **SDPA["gqa"])
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float64, names=names,
                             float32_atol=1e-12)
    q, k, v = (t.detach().float() for t in inputs)
    ours = pa.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="torch")
    theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_fully_masked_rows_give_zero_output_grads_and_minus_inf_lse():
    mask = torch.rand(1, 2, 6, 7, generator=G) < 0.5
    mask[:, :, 2] = False
    kernel_fn, reference_fn, inputs, names = sdpa_case("torch", q_len=6, kv_len=7, mask=mask)
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)
    q, k, v = (t.detach().float() for t in inputs[:3])
    out, lse = dispatch.forward_op("torch")(*sdpa_problem(q, k, v, attn_mask=mask))
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, :2]).all()


PEER = {
    "joint-everything": dict(q_lens=[5, 17, 9], kv_lens=[7, 19, 3], batch=2, q_heads=2, kv_heads=1,
                             peers=[[1, 0, 1], [1, 1, 1], [0, 1, 1]], gate_shape=(1, 3, 3, 2, 12),
                             bias_shape=(2, 3, 3, 1), kv_lengths=torch.tensor([[7, 2, 3], [0, 19, 1]]),
                             is_causal=True),
    "peer-everything": dict(q_lens=[5, 17, 9], kv_lens=[7, 19, 3], batch=2, q_heads=2, kv_heads=1,
                            peers=[[1, 0, 1], [1, 1, 1], [0, 1, 1]], gate_shape=(2, 3, 3, 2, 12),
                            kv_lengths=torch.tensor([[7, 2, 3], [0, 19, 1]]), normalize="peer",
                            is_causal=True),
    "joint-gqa-gate-shared-by-heads": dict(q_lens=[6, 4], kv_lens=[5, 8], q_heads=4, kv_heads=2,
                                           gate_shape=(2, 2, 1, 12), bias_shape=(2, 2, 4)),
    "empty-streams": dict(q_lens=[0, 6, 4], kv_lens=[5, 0, 8], gate_shape=(3, 3, 1, 12),
                          bias_shape=(3, 3, 2)),
    "empty-streams-peer": dict(q_lens=[0, 6, 4], kv_lens=[5, 0, 8], gate_shape=(12,),
                               normalize="peer", reference_peers=[[1, 0, 1]] * 3),
    "stream-without-peers": dict(q_lens=[6, 4], kv_lens=[5, 8], peers=[[0, 0], [1, 1]],
                                 gate_shape=(2, 2, 1, 12), bias_shape=(2, 2, 1)),
    "causal-L<M-and-L>M": dict(q_lens=[21, 4], kv_lens=[6, 18], is_causal=True, bias_shape=(2, 2, 1)),
    "one-stream-gate-and-bias": dict(q_lens=[7], kv_lens=[9], gate_shape=(1, 1, 1, 2, 12),
                                     bias_shape=(1, 1, 1, 2)),
    "one-stream-peer-mode-gqa-causal": dict(q_lens=[7], kv_lens=[5], q_heads=4, kv_heads=2,
                                            normalize="peer", is_causal=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(PEER))
def test_peer_matches_reference(name, dtype):
    kernel_fn, reference_fn, inputs, names = peer_case("torch", **PEER[name])
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)


@pytest.mark.parametrize("features", FEATURES, ids=feature_id)
def test_every_feature_combination_float64(features):
    """Two streams, odd sizes, all peers but one pair; float64 to 1e-12 (the composition adds
    no error of its own)."""
    f = features
    case = dict(q_lens=[5, 9], kv_lens=[7, 4], q_heads=2, kv_heads=1 if f["gqa"] else 2,
                peers=[[1, 1], [0, 1]], normalize=f["normalize"], is_causal=f["is_causal"],
                gate_shape=(1, 2, 2, 2, 12) if f["gate"] else None,
                bias_shape=(1, 2, 2, 2) if f["bias"] else None,
                kv_lengths=torch.tensor([[3, 4]]) if f["kv_lengths"] else None)
    kernel_fn, reference_fn, inputs, names = peer_case("torch", **case)
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float64, names=names,
                             float32_atol=1e-12)


def test_gate_and_bias_in_float32_with_bfloat16_streams():
    """The API upcasts broadcast 16-bit gate/bias that need grad to float32: served as such."""
    gen = torch.Generator().manual_seed(5)
    qs = [torch.randn(1, 2, L, 16, generator=gen).bfloat16() for L in (5, 3)]
    ks = [torch.randn(1, 2, M, 16, generator=gen).bfloat16() for M in (4, 6)]
    vs = [torch.randn(1, 2, M, 8, generator=gen).bfloat16() for M in (4, 6)]
    gate = torch.rand(2, 2, 1, 8, generator=gen).bfloat16().requires_grad_()
    bias = torch.randn(2, 2, 1, generator=gen).bfloat16().requires_grad_()
    outs = pa.peer_attention(qs, ks, vs, gate=gate, bias=bias, backend="torch")
    ref = pa.peer_attention([t.double() for t in qs], [t.double() for t in ks],
                            [t.double() for t in vs], gate=gate.double(), bias=bias.double(),
                            backend="reference")
    for o, r in zip(outs, ref):
        assert o.dtype == torch.bfloat16
        assert (o.double() - r).abs().max() < 3e-2
    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), (gate, bias))
    want = torch.autograd.grad(sum(r.sum() for r in ref), (gate, bias))
    for g, w, like in zip(grads, want, (gate, bias)):
        assert g.dtype == like.dtype and g.shape == like.shape
        assert (g.double() - w).abs().max() < 5e-2


# ---- the variants it serves through the problem seam: sinks, the diagonal (varlen) peer table ----

def _problem(q, k, v, q_lens, kv_lens, peers=(1,), sinks=None, is_causal=False, scale=0.3, **variant):
    return AttentionProblem(q, k, v, tuple(q_lens), tuple(kv_lens), tuple(peers), None, None, None,
                            None, None, 0.0, is_causal, scale, "joint", sinks=sinks, **variant)


def _op_outputs_and_grads(name, problem, grad_out):
    leaves = [t for t in problem if isinstance(t, torch.Tensor) and t.requires_grad]
    out, lse = dispatch.forward_op(name)(*problem)
    return [out, lse] + list(torch.autograd.grad(out, leaves, grad_out))


VARIANTS = {
    "sinks": dict(q_lens=(6,), kv_lens=(9,), sinks=True),
    "varlen": dict(q_lens=(4, 0, 7), kv_lens=(5, 3, 7), peers=()),
    "varlen-causal-sinks": dict(q_lens=(4, 0, 7), kv_lens=(5, 3, 7), peers=(), is_causal=True, sinks=True),
    # bottom-right causal, L < M and L > M (the first rows of the latter see no key)
    "bottom-right-causal-L<M": dict(q_lens=(5,), kv_lens=(11,), is_causal=True, bottom_right=True),
    "bottom-right-causal-L>M": dict(q_lens=(11,), kv_lens=(5,), is_causal=True, bottom_right=True),
    "window-top-left": dict(q_lens=(9,), kv_lens=(9,), window_left=3, window_right=1),
    "window-bottom-right-varlen": dict(q_lens=(4, 7), kv_lens=(6, 5), peers=(), window_left=2,
                                       window_right=0, bottom_right=True),
    "window-self-pair-of-two-streams": dict(q_lens=(5, 6), kv_lens=(7, 4), peers=(1, 1, 0, 1),
                                            window_left=1, window_right=2),
}



@pytest.mark.parametrize("terms", [1, 2, 3, 5])
def test_merge_logsumexp_of_one_two_or_more_terms(terms):
    """The joint merge's lse: one term as is, two through logaddexp, more through a stack; all
    equal torch.logsumexp in float64, -inf (weights exp(term - safe) of 0, not nan) on rows
    where every term is -inf, and on rows where only some are."""
    from peer_attention.lse_merge import safe_logsumexp
    gen = torch.Generator().manual_seed(terms)
    parts = [torch.randn(2, 3, 6, generator=gen, dtype=torch.float64) * 30 for _ in range(terms)]
    for i, part in enumerate(parts):
        part[:, :, 0] = float("-inf")  # every term -inf
        if terms > 1:
            part[:, 1, 1 + i % 5] = float("-inf")  # one term -inf
    total, safe = safe_logsumexp(parts, torch.float64)
    torch.testing.assert_close(total, torch.stack(parts).logsumexp(0), atol=1e-12, rtol=0)
    assert torch.isneginf(total[:, :, 0]).all() and torch.isfinite(safe).all()
    weights = torch.stack([torch.exp(part - safe) for part in parts])
    assert not weights.isnan().any() and (weights[:, :, :, 0] == 0).all()
    torch.testing.assert_close(weights[:, :, :, 1:].sum(0), torch.ones(2, 3, 5, dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("q_lens", [(5, 2, 7), (5, 0, 7)], ids=["full", "empty-stream"])
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_three_streams_every_pair_with_gate_bias_and_sinks_float64(normalize, q_lens):
    """Three streams on every peer (the merge of three terms, four with the sink), gate and
    bias (joint) per pair, GQA, with and without an empty query stream (whose pairs have no
    gate or bias gradient terms): outputs, lse and every gradient to 1e-12."""
    gen = torch.Generator().manual_seed(9)
    kv_lens = (6, 3, 4)
    joint = normalize == "joint"
    q = torch.randn(2, 4, sum(q_lens), 16, generator=gen, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, 2, sum(kv_lens), 16, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 2, sum(kv_lens), 12, generator=gen, dtype=torch.float64).requires_grad_()
    gate = torch.rand(2, 3, 3, 4, 12, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64).requires_grad_() if joint else None
    sinks = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_() if joint else None
    problem = AttentionProblem(q, k, v, q_lens, kv_lens, (1,) * 9, gate, bias, None, None, None,
                               0.0, True, 0.3, normalize, sinks=sinks)
    grad_out = torch.randn(2, 4, sum(q_lens), 12, generator=gen, dtype=torch.float64)
    got = _op_outputs_and_grads("torch", problem, grad_out)
    want = _op_outputs_and_grads("reference", problem, grad_out)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_reference_float64(variant):
    """sinks, the diagonal (varlen) peer table, windows and bottom-right alignment, through the
    ops (the public functions for them belong to the flash-attn API)."""
    gen = torch.Generator().manual_seed(7)
    case = dict(VARIANTS[variant])
    q_lens, kv_lens = case.pop("q_lens"), case.pop("kv_lens")
    q = torch.randn(2, 4, sum(q_lens), 16, generator=gen, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, 2, sum(kv_lens), 16, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 2, sum(kv_lens), 12, generator=gen, dtype=torch.float64).requires_grad_()
    if case.pop("sinks", False):
        case["sinks"] = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    problem = _problem(q, k, v, q_lens, kv_lens, **case)
    assert dispatch.select(problem).name == "torch"
    grad_out = torch.randn(2, 4, sum(q_lens), 12, generator=gen, dtype=torch.float64)
    got = _op_outputs_and_grads("torch", problem, grad_out)
    want = _op_outputs_and_grads("reference", problem, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_bottom_right_causal_with_a_float_mask_gradient():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64).requires_grad_()
               for n in (6, 4, 4))
    mask = torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64).requires_grad_()
    problem = sdpa_problem(q, k, v, attn_mask=mask)._replace(is_causal=True, bottom_right=True)
    grad_out = torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64)
    got = _op_outputs_and_grads("torch", problem, grad_out)
    want = _op_outputs_and_grads("reference", problem, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


# ---- dropout: torch's own numbers ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_dropout_reproduces_torch_exactly(dtype, masked):
    """Same torch.manual_seed: the same output, gradients and generator state afterwards as
    torch's own CPU SDPA (which serves dropout with its math path)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, 4, 9, 8, generator=gen).to(dtype)
    k = torch.randn(2, 3, 2, 13, 8, generator=gen).to(dtype)
    v = torch.randn(2, 3, 2, 13, 6, generator=gen).to(dtype)
    mask = (torch.rand(9, 13, generator=gen) < 0.7) if masked else None
    grad_out = torch.randn(2, 3, 4, 9, 6, generator=gen).to(dtype)
    results = []
    for fn in (F.scaled_dot_product_attention,
               lambda *a, **kw: pa.scaled_dot_product_attention(*a, **kw, backend="torch")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(123)
        out = fn(*leaves, attn_mask=mask, dropout_p=0.3, enable_gqa=True)
        after = torch.rand(3)  # the generator advanced exactly as far
        results.append([out, after, *torch.autograd.grad(out, leaves, grad_out)])
    for theirs, ours in zip(*results):
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)
    undropped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (results[0][0] - undropped).abs().max() > 1e-2  # dropout did something


def test_dropout_under_patch_torch_gives_torchs_numbers(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=gen) for _ in range(3))
    torch.manual_seed(9)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    with recorded_dispatch("output_and_backend", record="backend") as served, pa.patch_torch():
        torch.manual_seed(9)
        ours = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert served == ["torch"]
    assert torch.equal(ours, theirs)


def test_keep_mask_is_the_mask_the_forward_applied():
    """torch_dropout.keep_mask (for recomputations such as double backward) against the forward:
    with value = identity the output is the dropped weights, zero exactly where dropped."""
    from peer_attention.backends.torch_dropout import keep_mask

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64).expand(2, 2, 7, 7)
    problem = dispatch.BACKENDS["torch"].prepare(sdpa_problem(q, k, eye, dropout_p=0.4, enable_gqa=True))
    assert problem.dropout_seed.dtype == torch.uint8  # the generator state, as dispatch passes it
    weights = dispatch.forward_op("torch")(*problem)[0]
    keep = keep_mask(problem)
    assert keep.shape == (2, 4, 5, 7) and keep.any() and (~keep).any()
    assert torch.equal(weights != 0, keep)


def test_dropout_calls_in_a_row_draw_different_masks_like_torch():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    torch.manual_seed(5)
    theirs = [F.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(2)]
    torch.manual_seed(5)
    ours = [pa.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(2)]  # auto
    assert not torch.equal(ours[0], ours[1])
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_dropout_with_a_hand_made_seed_is_deterministic():
    """A problem built without the API's seed draw (an int64 [seed, offset]) seeds a private
    generator: same seed, same mask; backward with the same mask as forward."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    seed = torch.tensor([17, 0])
    problem = sdpa_problem(q, k, v)._replace(dropout_p=0.4, dropout_seed=seed)
    op = dispatch.forward_op("torch")
    first, again = op(*problem)[0], op(*problem)[0]
    assert torch.equal(first, again)
    undropped = op(*problem._replace(dropout_p=0.0, dropout_seed=None))[0]
    assert (first - undropped).abs().max() > 1e-2
    torch.autograd.gradcheck(lambda q, k, v: op(*problem._replace(q=q, k=k, v=v))[0], (q, k, v))


# ---- dispatch ----

def test_auto_picks_torch_on_cpu_for_every_feature_it_claims():
    q = torch.randn(1, 2, 5, 8)
    for problem in (sdpa_problem(q, q, q), sdpa_problem(q, q, q, is_causal=True),
                    sdpa_problem(q, q, q, dropout_p=0.1),
                    sdpa_problem(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))):
        assert dispatch.select(problem).name == "torch"


@pytest.mark.parametrize("variant, word", [
    (dict(softcap=5.0), "softcap"), (dict(alibi_slopes=torch.ones(1, 2)), "ALiBi"),
    (dict(bottom_right=True, dropout_p=0.1, dropout_seed=torch.tensor([1, 0])), "dropout with"),
])
def test_declines_what_torchs_kernels_cannot_express(variant, word):
    q = torch.randn(1, 2, 5, 8)
    problem = sdpa_problem(q, q, q)._replace(**variant)
    reasons = dispatch.BACKENDS["torch"].not_supported_reasons(problem)
    assert any(word in r for r in reasons), reasons
    assert dispatch.select(problem).name == "reference"
    with pytest.raises(NotImplementedError, match="torch"):
        dispatch.select(problem, "torch")


def test_callers_tensors_are_not_modified():
    gen = torch.Generator().manual_seed(4)
    qs = [torch.randn(1, 2, L, 8, generator=gen, requires_grad=True) for L in (4, 6)]
    gate = torch.rand(2, 2, 1, 8, generator=gen, requires_grad=True)
    copies = [t.detach().clone() for t in qs + [gate]]
    outs = pa.peer_attention(qs, qs, qs, gate=gate, kv_lengths=torch.tensor([[2, 6]]), backend="torch")
    sum(o.sum() for o in outs).backward()
    for t, c in zip(qs + [gate], copies):
        assert torch.equal(t.detach(), c)


# ---- CUDA (torch's efficient-attention kernel): runs only where a GPU is present ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sdpa_and_peer_match_reference(dtype):
    for name in ("causal-L>M", "gqa", "float-mask-grad", "float-mask-with-masked-rows"):
        kernel_fn, reference_fn, inputs, names = sdpa_case("torch", **SDPA[name])
        inputs = [t.detach().cuda().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
        assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)
    for name in ("joint-everything", "peer-everything"):
        case = dict(PEER[name], kv_lengths=PEER[name]["kv_lengths"].cuda())
        kernel_fn, reference_fn, inputs, names = peer_case("torch", **case)
        inputs = [t.detach().cuda().requires_grad_() for t in inputs]
        assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)


@cuda
def test_cuda_declines_float64_and_dropout():
    q = torch.randn(1, 2, 5, 8, device="cuda")
    torch_backend = dispatch.BACKENDS["torch"]
    wide = sdpa_problem(q.double(), q.double(), q.double())
    assert any("float64" in r for r in torch_backend.not_supported_reasons(wide))
    dropped = sdpa_problem(q, q, q, dropout_p=0.1)
    assert any("dropout" in r for r in torch_backend.not_supported_reasons(dropped))


# ---- the registered op ----

def _opcheck_problems():
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    q, k, v = t(1, 2, 5, 16), t(1, 2, 7, 16), t(1, 2, 7, 12)
    yield "sdpa-float-mask", sdpa_problem(q, k, v, attn_mask=t(1, 1, 5, 7))
    qs = [t(1, 2, 5, 16), t(1, 2, 3, 16)]
    ks, vs = [t(1, 1, 4, 16), t(1, 1, 6, 16)], [t(1, 1, 4, 12), t(1, 1, 6, 12)]
    gate, bias = torch.rand(2, 2, 1, 12, generator=gen).requires_grad_(), t(2, 2, 1)
    yield "peer-joint-gate-bias-gqa", peer_problem(qs, ks, vs, gate=gate, bias=bias, is_causal=True,
                                                   kv_lengths=torch.tensor([[3, 6]]),
                                                   peers=[[1, 1], [0, 1]], enable_gqa=True)
    yield "peer-peer-mode", peer_problem(qs, ks, vs, gate=gate, normalize="peer", enable_gqa=True)


@pytest.mark.parametrize("problem", [pytest.param(p, id=name) for name, p in _opcheck_problems()])
def test_opcheck_torch_fwd(problem):
    """Schema, fake implementation (shapes and strides), autograd registration, AOT dispatch."""
    torch.library.opcheck(dispatch.forward_op("torch"), problem.op_args())


@pytest.mark.parametrize("problem", [pytest.param(p, id=name) for name, p in _opcheck_problems()])
def test_opcheck_torch_bwd(problem):
    """The backward op's outputs agree with its fake kernel (shapes, dtypes, strides)."""
    fwd, bwd = dispatch.forward_op("torch"), dispatch._ops["torch"][1]
    with torch.no_grad():
        out, lse = fwd(*problem.op_args())
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    needs = [isinstance(t, torch.Tensor) and t.requires_grad
             for t in (problem.q, problem.k, problem.v, problem.gate, problem.bias,
                       problem.attn_mask, problem.sinks)]
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in problem.op_args()]
    args = (grad_out, out, lse, *detached, needs)
    torch.library.opcheck(bwd, args, test_utils=("test_schema", "test_faketensor"))
    for grad in bwd(*args):  # the fake kernel's are contiguous: inductor asserts the strides
        assert grad.is_contiguous(), grad.stride()
