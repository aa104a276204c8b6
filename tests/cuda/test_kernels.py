"""The CUDA kernels against the reference (SPEC section 8), forward and backward, for every
feature the cuda backend claims. Skipped without a GPU or without the built extension."""
import importlib.util
import math

import pytest
import torch

import peer_attention
from peer_attention.reference import peer_attention_reference, sdpa_reference
from tests.dmask_cases import KV_LENGTHS, MASK_SHAPES, attention, deterministic, shape_id
from tests.dmask_cases import inputs as dmask_inputs
from tests.helpers import assert_matches_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("peer_attention._C") is None,
                       reason="peer_attention._C was not built"),
]

DTYPES = [torch.float16, torch.bfloat16]
DEVICE = "cuda"


def _randn(*shape, gen, requires_grad=True):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_(
        requires_grad)


def check_peer(dtype, *, q_lens, kv_lens, B=2, Hq=2, H=2, E=64, Ev=64, peers=None,
               gate_shape=None, bias_shape=None, normalize="joint", is_causal=False,
               kv_lengths=None, scale=None, grad=True, seed=0, gate_peer_scale=None):
    """Compare peer_attention(backend="cuda") with the reference on random streams.
    gate_peer_scale: a factor per peer (the gate's dim 2) multiplying the random gate."""
    gen = torch.Generator().manual_seed(seed)
    S = len(q_lens)
    qs = [_randn(B, Hq, n, E, gen=gen) for n in q_lens]
    ks = [_randn(B, H, m, E, gen=gen) for m in kv_lens]
    vs = [_randn(B, H, m, Ev, gen=gen) for m in kv_lens]
    inputs = qs + ks + vs
    gate = bias = None
    if gate_shape is not None:
        gate = torch.rand(*gate_shape, dtype=torch.float64, generator=gen) + 0.5
        if gate_peer_scale is not None:
            gate = gate * torch.tensor(gate_peer_scale, dtype=torch.float64)[:, None, None]
        gate = gate.to(DEVICE)
        inputs.append(gate.requires_grad_(grad))
    if bias_shape is not None:
        bias = torch.randn(*bias_shape, dtype=torch.float64, generator=gen).to(DEVICE)
        inputs.append(bias.requires_grad_(grad))
    if kv_lengths is not None:
        kv_lengths = torch.tensor(kv_lengths, device=DEVICE)

    def split(args):
        args = list(args)
        q, k, v = args[:S], args[S:2 * S], args[2 * S:3 * S]
        rest = args[3 * S:]
        g = rest.pop(0) if gate is not None else None
        b = rest.pop(0) if bias is not None else None
        return q, k, v, g, b

    common = dict(peers=peers, normalize=normalize, is_causal=is_causal, kv_lengths=kv_lengths,
                  scale=scale)

    def kernel(*args):
        q, k, v, g, b = split(args)
        return peer_attention.peer_attention(q, k, v, gate=g, bias=b, backend="cuda",
                                             enable_gqa=Hq != H, **common)

    def reference(*args):
        q, k, v, g, b = split(args)
        return peer_attention_reference(q, k, v, gate=g, bias=b, **common)

    assert_matches_reference(kernel, reference, inputs, dtype, grad=grad, seed=seed)


# --- one stream: the SDPA case --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [32, 64, 96, 128])
def test_single_stream_head_dims(dtype, E):
    check_peer(dtype, q_lens=[128], kv_lens=[128], E=E, Ev=E)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,Ev", [(8, 8), (40, 40), (80, 80), (72, 24), (16, 120)])
def test_single_stream_padded_head_dims(dtype, E, Ev):
    check_peer(dtype, q_lens=[70], kv_lens=[90], E=E, Ev=Ev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,Ev", [(160, 160), (256, 256), (256, 64), (136, 200)])
def test_large_head_dims(dtype, E, Ev):
    check_peer(dtype, q_lens=[100], kv_lens=[77], E=E, Ev=Ev, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_streams_head_dim_256(dtype, normalize):
    check_peer(dtype, q_lens=[100, 40], kv_lens=[77, 90], E=256, Ev=256, Hq=4, H=2,
               gate_shape=(2, 2, 2, 4, 256), normalize=normalize, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,M", [(1, 1), (1, 200), (200, 1), (63, 65), (129, 257), (300, 17)])
def test_single_stream_lengths(dtype, L, M):
    check_peer(dtype, q_lens=[L], kv_lens=[M], B=1, E=64, Ev=64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,M", [(128, 128), (100, 100), (64, 200), (200, 64)])
def test_single_stream_causal(dtype, L, M):
    check_peer(dtype, q_lens=[L], kv_lens=[M], is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa(dtype):
    check_peer(dtype, q_lens=[96, 40], kv_lens=[80, 50], Hq=6, H=2, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale(dtype):
    check_peer(dtype, q_lens=[64], kv_lens=[64], scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, -0.2])
def test_scale_not_positive(dtype, scale):
    # the plain forward folds the scale into exp2 (scale > 0); these take forward_kernel
    check_peer(dtype, q_lens=[70], kv_lens=[90], scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [32, 64, 96, 128])
@pytest.mark.parametrize("L,M,kv_lengths", [(384, 448, None), (300, 520, None),
                                            (400, 400, [[333], [64]])])
def test_unmasked_main_loops(dtype, E, L, M, kv_lengths):
    # several full key / query tiles before and after the causal diagonal and the kv limit:
    # the plain kernels' unmasked steps (forward 128x64, dQ 64x64, dK/dV 64x64 tiles)
    for is_causal in (False, True):
        check_peer(dtype, q_lens=[L], kv_lens=[M], E=E, Ev=E, is_causal=is_causal,
                   kv_lengths=kv_lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,Ev", [(160, 160), (192, 192), (152, 176)])
def test_head_dims_160_192(dtype, E, Ev):
    # their own kernels (dK/dV in two channel halves), served on sm_86/89/120 too
    check_peer(dtype, q_lens=[130, 60], kv_lens=[100, 70], E=E, Ev=Ev, is_causal=True,
               gate_shape=(2, 2, 2, 2, Ev))


# --- several streams ------------------------------------------------------------------------

PEERS3 = [[True, True, False], [False, True, True], [True, False, True]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,Ev", [(32, 32), (96, 96), (80, 72), (128, 128)])
def test_plain_forward_streams_gqa(dtype, E, Ev):
    # the plain forward (forward_plain.cuh: 128 x 64 tiles, row state in shared memory, the K
    # copy of a peer's first tile issued during the previous peer's last one, D = 96 copied in
    # 32-column blocks; 80 / 72 run padded in the 96 kernel) over several full and partial key
    # tiles per peer, 3 streams, GQA, kv_lengths, causal self pairs or not
    for is_causal in (False, True):
        check_peer(dtype, q_lens=[300, 129, 1], kv_lens=[200, 333, 64], Hq=4, H=2, E=E, Ev=Ev,
                   peers=PEERS3, is_causal=is_causal, kv_lengths=[[200, 333, 64], [77, 0, 40]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
@pytest.mark.parametrize("E,Ev", [(32, 32), (64, 64), (80, 72), (128, 128)])
def test_forward_feature_switches(dtype, normalize, E, Ev):
    # forward_plain_kernel's gate, bias, gate + bias and peer-mode instantiations (D <= 128:
    # launch.h's run_forward) over full and partial key tiles of 3 peers, causal self pairs, GQA,
    # kv_lengths (an empty peer); the gate's magnitude differs by 1e6 between peers and one
    # peer's is 0 (the joint gate's per-peer exponent and its exact rescale of the accumulator)
    for gate_on, bias_on in ((True, False), (False, True), (True, True)):
        check_peer(dtype, q_lens=[300, 129, 1], kv_lens=[200, 333, 64], Hq=4, H=2, E=E, Ev=Ev,
                   peers=PEERS3, is_causal=True, kv_lengths=[[200, 333, 64], [77, 0, 40]],
                   gate_shape=(2, 3, 3, 4, Ev) if gate_on else None,
                   gate_peer_scale=[1e3, 0.0, 1e-3] if gate_on else None,
                   bias_shape=(2, 3, 3, 4) if bias_on else None, normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_streams_peer_table(dtype, normalize):
    check_peer(dtype, q_lens=[70, 33, 128], kv_lens=[50, 140, 64], peers=PEERS3,
               normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_streams_gate(dtype, normalize):
    check_peer(dtype, q_lens=[70, 33], kv_lens=[50, 100], gate_shape=(2, 2, 2, 2, 64),
               normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_streams_broadcast_gate(dtype, normalize):
    check_peer(dtype, q_lens=[40, 90], kv_lens=[65, 30], gate_shape=(1, 2, 2, 1, 1),
               normalize=normalize, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_streams_bias(dtype):
    check_peer(dtype, q_lens=[70, 33], kv_lens=[50, 100], bias_shape=(2, 2, 2, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_streams_gate_bias_causal(dtype):
    check_peer(dtype, q_lens=[130, 64, 20], kv_lens=[130, 30, 20], bias_shape=(1, 3, 3, 1),
               gate_shape=(2, 3, 3, 2, 64), is_causal=True, peers=PEERS3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_streams_kv_lengths(dtype, normalize):
    check_peer(dtype, q_lens=[70, 64], kv_lens=[90, 64], kv_lengths=[[90, 0], [17, 64]],
               normalize=normalize, is_causal=True, gate_shape=(2, 2, 2, 1, 64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_streams_empty_rows_and_streams(dtype, normalize):
    # stream 1 attends to nobody; stream 2 is empty; in "joint" mode rows of stream 0 also see
    # the empty stream 2 (the reference cannot take an attended empty key stream in "peer" mode:
    # its per-peer softmax reduces over zero keys)
    peers = [[True, False, normalize == "joint"], [False, False, False], [True, True, True]]
    check_peer(dtype, q_lens=[20, 30, 0], kv_lens=[10, 40, 0], peers=peers, normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_streams_head_dims(dtype, normalize):
    for E, Ev in ((32, 32), (96, 96), (128, 128), (48, 80)):
        check_peer(dtype, q_lens=[50, 70], kv_lens=[60, 45], E=E, Ev=Ev, normalize=normalize,
                   gate_shape=(1, 2, 2, 2, Ev))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float", "float_broadcast"])
def test_sdpa_attn_mask(dtype, kind):
    gen = torch.Generator().manual_seed(2)
    B, H, L, M, E = 2, 3, 70, 90, 64
    q = _randn(B, H, L, E, gen=gen)
    k, v = _randn(B, H, M, E, gen=gen), _randn(B, H, M, E, gen=gen)
    if kind == "bool":
        mask = torch.rand(B, 1, L, M, generator=gen) > 0.3
        mask[:, :, 5] = False  # a row that may attend to nothing: output and gradients 0
        mask = mask.to(DEVICE)
    elif kind == "float":
        mask = _randn(B, H, L, M, gen=gen)  # a float mask that requires grad
    else:
        mask = _randn(1, 1, L, M, gen=gen)

    def kernel(q, k, v, mask):
        return peer_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           backend="cuda")

    assert_matches_reference(kernel, sdpa_reference, [q, k, v, mask], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [96, 128])
def test_key_major_query_slices_features_and_mask(dtype, E):
    # the dK/dV kernel's features and mask instantiations at the head dims where key_major_choice
    # forms S^T and dP^T in query slices and keeps the block's values in registers or shared
    # memory per architecture: several key blocks and query tiles, partial ones, causal
    check_peer(dtype, q_lens=[150, 70], kv_lens=[150, 90], E=E, Ev=E, is_causal=True,
               gate_shape=(2, 2, 2, 2, E), bias_shape=(2, 2, 2, 2))
    gen = torch.Generator().manual_seed(3)
    q = _randn(2, 2, 150, E, gen=gen)
    k, v = _randn(2, 2, 170, E, gen=gen), _randn(2, 2, 170, E, gen=gen)
    mask = _randn(2, 2, 150, 170, gen=gen)

    def kernel(q, k, v, mask):
        return peer_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           backend="cuda")

    assert_matches_reference(kernel, sdpa_reference, [q, k, v, mask], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_drop_in(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 77, 64, generator=gen, dtype=torch.float64).to(DEVICE)
               .requires_grad_() for _ in range(3))

    def kernel(q, k, v):
        return peer_attention.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           backend="cuda")

    def reference(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v

    assert_matches_reference(kernel, reference, [q, k, v], dtype)


# --- fixes of the static review (issue 10) ---------------------------------------------------

def _problem_op(backend, q, k, v, q_lens, kv_lens, *, is_causal=False, bottom_right=False,
                peers=None, gate=None, bias=None, normalize="joint"):
    """Run backend's registered op on a hand-built problem (fields the public API may not
    expose); returns the packed output."""
    from peer_attention import dispatch
    from peer_attention.problem import AttentionProblem

    S = len(q_lens)
    problem = AttentionProblem(
        q, k, v, tuple(q_lens), tuple(kv_lens), tuple(peers or (1,) * (S * S)), gate, bias, None,
        None, None, 0.0, is_causal, 1.0 / math.sqrt(q.shape[-1]), normalize,
        bottom_right=bottom_right)
    out, _ = dispatch.forward_op(backend)(*problem)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens,kv_lens", [((100,), (230,)), ((230,), (100,)), ((64,), (64,)),
                                            ((70, 150), (150, 20))])
@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_bottom_right_causal(dtype, q_lens, kv_lens, normalize):
    gen = torch.Generator().manual_seed(3)
    q = _randn(2, 2, sum(q_lens), 64, gen=gen)
    k, v = _randn(2, 2, sum(kv_lens), 64, gen=gen), _randn(2, 2, sum(kv_lens), 64, gen=gen)

    def run(backend):
        return lambda q, k, v: _problem_op(backend, q, k, v, q_lens, kv_lens, is_causal=True,
                                           bottom_right=True, normalize=normalize)

    assert_matches_reference(run("cuda"), run("reference"), [q, k, v], dtype)


@pytest.mark.parametrize("B,H", [(70000, 1), (1, 70000)])
def test_leading_dims_beyond_65535(B, H):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (_randn(B, H, 8, 32, gen=gen) for _ in range(3))

    def kernel(q, k, v):
        return peer_attention.scaled_dot_product_attention(q, k, v, backend="cuda")

    assert_matches_reference(kernel, sdpa_reference, [q, k, v], torch.float16)


def test_unrequested_gradients_do_not_alias():
    from peer_attention import dispatch

    q = torch.randn(1, 2, 16, 64, device=DEVICE, dtype=torch.float16)
    args = (q, q, q, (16,), (16,), (1,), None, None, None, None, None, 0.0, False, 0.125, "joint",
            -1, -1, False, 0.0, None, None)
    out, lse = dispatch.forward_op("cuda")(*args)
    grads = torch.ops.peer_attention.cuda_bwd(torch.ones_like(out), out, lse, *args,
                                              [True] + [False] * 6)
    assert all(g.numel() == 0 for g in grads[1:])
    assert len({g.untyped_storage()._cdata for g in grads}) == 7  # seven distinct storages


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_gate_and_bias_with_16bit_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    qs = [_randn(2, 2, n, 64, gen=gen).to(dtype) for n in (40, 70)]
    gate = torch.rand(2, 2, 2, 2, 64, generator=gen).to(DEVICE).requires_grad_()
    bias = torch.randn(2, 2, 2, 2, generator=gen).to(DEVICE).requires_grad_()
    outs = peer_attention.peer_attention(qs, qs, qs, gate=gate, bias=bias, backend="cuda")
    assert all(o.dtype == dtype for o in outs)
    dgate, dbias = torch.autograd.grad(sum(o.float().sum() for o in outs), [gate, bias])
    assert dgate.dtype == torch.float32 and dbias.dtype == torch.float32
    want = peer_attention.peer_attention(qs, qs, qs, gate=gate, bias=bias, backend="reference")
    ref_dgate, ref_dbias = torch.autograd.grad(sum(o.float().sum() for o in want), [gate, bias])
    torch.testing.assert_close(dgate, ref_dgate, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dbias, ref_dbias, atol=5e-2, rtol=2e-2)


def test_fp16_broadcast_gate_gradient_within_spec_bound():
    # 256 expanded terms per gate entry: summed in float32 (the API upcasts the broadcast gate)
    check_peer(torch.float16, q_lens=[64, 64], kv_lens=[64, 64], B=2, Hq=2, H=2, E=64, Ev=64,
               gate_shape=(1, 2, 2, 1, 1))


def test_kernel_image_for_this_device():
    from peer_attention.backends.cuda import kernel_image_error

    assert kernel_image_error(torch.cuda.current_device()) == ""


# --- the fused backward (dQ by atomics) and the split one (deterministic algorithms) ----------

def _backward_kernel_names(fn):
    """Names of the CUDA kernels fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.key for e in prof.key_averages())


@pytest.fixture(params=[False, True], ids=["fused", "deterministic_split"])
def deterministic_mode(request):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,Ev", [(32, 32), (64, 64), (96, 96), (128, 128), (80, 80), (40, 120)])
@pytest.mark.parametrize("L,M,is_causal", [(63, 65, False), (129, 257, True), (200, 64, True),
                                           (1, 70, False)])
def test_fused_backward_head_dims_and_lengths(deterministic_mode, dtype, E, Ev, L, M, is_causal):
    # plain backward at every kernel head dim <= 128 (80 and 40/120: padded into 96 and 128),
    # partial last query and key tiles (the fused kernel's masked step), causal, one query row;
    # the same cases with torch.use_deterministic_algorithms(True) take dq_kernel + dkdv_kernel
    check_peer(dtype, q_lens=[L], kv_lens=[M], B=2, Hq=2, H=2, E=E, Ev=Ev, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [64, 128])
def test_fused_backward_gqa_streams_kv_lengths(dtype, E):
    # GQA (dK/dV of 3 query heads per key head summed by atomics), several streams whose dQ
    # rows are packed next to each other (a partial last tile of stream 0 sits before stream 1's
    # rows), kv_lengths, causal self pairs with bottom-right alignment off
    check_peer(dtype, q_lens=[70, 130], kv_lens=[90, 65], B=2, Hq=6, H=2, E=E, Ev=E,
               is_causal=True, kv_lengths=[[90, 40], [17, 65]])


def test_fused_backward_is_the_plain_path_split_under_determinism():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (_randn(1, 2, 100, 64, gen=gen).to(torch.float16).detach().requires_grad_()
               for _ in range(3))

    def backward():
        out = peer_attention.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
        out.float().sum().backward()

    names = _backward_kernel_names(backward)
    assert "bwd_fused_kernel" in names and "dq_kernel" not in names, names
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        names = _backward_kernel_names(backward)
    finally:
        torch.use_deterministic_algorithms(before)
    assert "bwd_fused_kernel" not in names and "dq_kernel" in names and "dkdv_kernel" in names, \
        names
    # only dQ asked for: the dQ kernel alone (3 products instead of the fused 5)
    q.grad = None
    names = _backward_kernel_names(lambda: torch.autograd.grad(
        peer_attention.scaled_dot_product_attention(q, k.detach(), v.detach(), backend="cuda")
        .float().sum(), [q]))
    assert "bwd_fused_kernel" not in names and "dq_kernel" in names, names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=shape_id)
@pytest.mark.parametrize("determinism", [False, True], ids=["atomic", "deterministic"])
def test_broadcast_mask_gradient(dtype, shape, determinism):
    """A float mask broadcast over batch, heads or queries: its gradient is added at the mask's
    own shape by the dQ kernel (atomics; dense then summed under deterministic algorithms), with
    GQA, causal and kv_lengths (issue 23)."""
    with deterministic(determinism):
        for causal in (False, True):
            assert_matches_reference(attention("cuda", causal, KV_LENGTHS),
                                     attention("reference", causal, KV_LENGTHS),
                                     dmask_inputs(shape, device=DEVICE), dtype,
                                     names=["q", "k", "v", "mask"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1, 1, 90), (1, 1, 1, 90), (1, 4, 1, 90)], ids=shape_id)
def test_query_broadcast_mask_gradient_over_tiles(dtype, shape):
    """A mask broadcast over queries: the dQ kernel sums each warp's 16 query rows before one
    atomic per key column (add_dmask_columns). Several query tiles and warps, partial tiles,
    causal and kv_lengths, D = 64."""
    B, Hq, H, Tq, Tk, E = 2, 4, 2, 150, 90, 64
    kv_lengths = torch.tensor([[Tk], [70]], dtype=torch.int32)
    for causal in (False, True):
        assert_matches_reference(attention("cuda", causal, kv_lengths, sizes=(B, Hq, Tq, Tk)),
                                 attention("reference", causal, kv_lengths, sizes=(B, Hq, Tq, Tk)),
                                 dmask_inputs(shape, device=DEVICE, sizes=(B, Hq, H, Tq, Tk, E)),
                                 dtype, names=["q", "k", "v", "mask"])


def test_cuda_bwd_returns_dmask_at_dmask_shape():
    """The op returns dmask at its dmask_shape argument (what the fake kernel declares), whether
    the mask it is handed is broadcast (stride 0) or materialised; the same gradient either way."""
    from peer_attention import dispatch

    B, H, L = 2, 4, 40
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, L, 64, generator=gen).to(DEVICE, torch.float16) for _ in range(3))
    base = torch.randn(1, 1, L, L, generator=gen).to(DEVICE)
    grad_out = torch.randn(B, H, L, 64, generator=gen).to(DEVICE, torch.float16)
    needs = [False] * 5 + [True, False]
    sums = []
    for mask, dmask_shape, want in [
            (base.expand(B, H, L, L), None, (1, 1, L, L)),
            (base.expand(B, H, L, L), [1, 1, L, L], (1, 1, L, L)),
            (base.expand(B, H, L, L).contiguous(), [1, 1, L, L], (1, 1, L, L)),
            (base.expand(B, H, L, L).contiguous(), None, (B, H, L, L)),
            (base.expand(B, H, L, L), [B, H, L, L], (B, H, L, L))]:  # shares of the sum
        args = (q, k, v, (L,), (L,), (1,), None, None, None, mask, None, 0.0, False, 0.125,
                "joint", -1, -1, False, 0.0, None, None)
        out, lse = dispatch.forward_op("cuda")(*args)
        dmask = torch.ops.peer_attention.cuda_bwd(grad_out, out, lse, *args, needs,
                                                  dmask_shape)[5]
        assert tuple(dmask.shape) == want and dmask.is_contiguous()
        sums.append(dmask.sum_to_size(1, 1, L, L))
    for s in sums[1:]:
        torch.testing.assert_close(s, sums[0], atol=1e-4, rtol=1e-4)


def test_broadcast_mask_gradient_needs_no_dense_buffer():
    """Peak memory of the backward with a (1, 1, L, L) float mask stays far below the dense
    float32 (B, H, L, L) buffer the dQ kernel used to fill (1 GiB here; the mask is 16 MiB)."""
    B, H, L = 8, 8, 2048
    q, k, v = (torch.randn(B, H, L, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    mask = torch.randn(1, 1, L, L, device=DEVICE, requires_grad=True)
    out = peer_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out.sum().backward()
    torch.cuda.synchronize()
    dense = B * H * L * L * 4
    assert torch.cuda.max_memory_allocated() - before < dense // 2
    assert mask.grad.shape == mask.shape and torch.isfinite(mask.grad).all()
