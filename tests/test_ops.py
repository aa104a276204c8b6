"""The registered ops (SPEC section 6): torch.library.opcheck, fake implementations, and
torch.compile(fullgraph=True) through the public functions."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import peer_attention as pa
from peer_attention import api, dispatch

F64 = torch.float64


def rand(*shape, grad=True, gen=None):
    return torch.randn(*shape, dtype=F64, generator=gen).requires_grad_(grad)


def base_qkv(seed=0, hq=2, h=2):
    gen = torch.Generator().manual_seed(seed)
    return rand(1, hq, 3, 4, gen=gen), rand(1, h, 5, 4, gen=gen), rand(1, h, 5, 3, gen=gen)


def two_stream_problem(**kwargs):
    q, k, v = base_qkv()
    q2, k2, v2 = (t.detach()[:, :, :2].clone().requires_grad_() for t in (q, k, v))
    return api.peer_problem([q, q2], [k, k2], [v, v2], **kwargs)


PROBLEMS = {
    "sdpa": lambda: api.sdpa_problem(*base_qkv()),
    "sdpa_causal_gqa": lambda: api.sdpa_problem(*base_qkv(hq=4, h=2), is_causal=True,
                                                enable_gqa=True),
    "sdpa_bool_mask": lambda: api.sdpa_problem(*base_qkv(),
                                               attn_mask=torch.rand(3, 5) > 0.3),
    "sdpa_float_mask_grad": lambda: api.sdpa_problem(*base_qkv(), attn_mask=rand(2, 3, 5)),
    "sdpa_dropout": lambda: api.sdpa_problem(*base_qkv(), dropout_p=0.3),
    "sdpa_leading_dims": lambda: api.sdpa_problem(rand(2, 2, 2, 3, 4), rand(2, 2, 2, 5, 4),
                                                  rand(2, 2, 2, 5, 3)),
    "peer_joint": lambda: two_stream_problem(),
    "peer_gate_bias": lambda: two_stream_problem(gate=rand(1, 2, 2, 1, 3),
                                                 bias=rand(2, 1)),
    "peer_kv_lengths_causal": lambda: two_stream_problem(kv_lengths=torch.tensor([[4, 1]]),
                                                         is_causal=True,
                                                         peers=[[True, False], [True, True]]),
    "peer_normalize_peer": lambda: two_stream_problem(normalize="peer", gate=rand(2, 1, 3)),
}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_opcheck_reference_fwd(name):
    problem = PROBLEMS[name]()
    result = torch.library.opcheck(dispatch.forward_op("reference"), problem.op_args())
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("name", ["sdpa_float_mask_grad", "peer_gate_bias", "peer_normalize_peer"])
def test_opcheck_reference_bwd(name):
    problem = PROBLEMS[name]()
    out, lse = dispatch.forward_op("reference")(*problem.op_args())
    grad_out = torch.randn_like(out)
    needs = [True, True, True, problem.gate is not None, problem.bias is not None,
             problem.attn_mask is not None, problem.sinks is not None]
    bwd = torch.ops.peer_attention.reference_bwd.default
    args = (grad_out, out.detach(), lse, *problem.op_args(), needs)
    result = torch.library.opcheck(bwd, args, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_fake_shapes_equal_real_shapes(name):
    problem = PROBLEMS[name]()
    args = problem.op_args()
    fwd = dispatch.forward_op("reference")
    bwd = torch.ops.peer_attention.reference_bwd.default
    needs = [True, True, True, problem.gate is not None, problem.bias is not None,
             problem.attn_mask is not None and problem.attn_mask.is_floating_point(),
             problem.sinks is not None]
    real = fwd(*args)
    real_grads = bwd(torch.ones_like(real[0]), real[0].detach(), real[1], *args, needs)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = fwd(*fake_args)
        grad_out = torch.ones(real[0].shape, dtype=real[0].dtype)
        fake_grads = bwd(grad_out, fake[0].detach(), fake[1], *fake_args, needs)
    for r, f in zip(list(real) + list(real_grads), list(fake) + list(fake_grads)):
        assert r.shape == f.shape and r.dtype == f.dtype, (r.shape, f.shape, r.dtype, f.dtype)
    # and the real outputs have the documented shapes
    out, lse = real
    assert out.shape == (*problem.q.shape[:3], problem.v.shape[-1])
    if problem.normalize == "peer":
        assert lse.shape == (*problem.q.shape[:2], problem.num_streams, problem.q.shape[2])
    else:
        assert lse.shape == problem.q.shape[:3]


# ------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------

def model(q, k, v, q2, k2, v2, gate, bias, kv_lengths):
    a = pa.scaled_dot_product_attention(q, k, v, is_causal=True)
    joint = pa.peer_attention([q, q2], [k, k2], [v, v2], peers=[[True, False], [True, True]],
                              gate=gate, bias=bias, kv_lengths=kv_lengths)
    per_peer = pa.peer_attention([q, q2], [k, k2], [v, v2], peers=[[True, True], [False, True]],
                                 normalize="peer", gate=gate, is_causal=True)
    # on the reference: in eager the `torch` backend replays torch's CPU generator state, which a
    # compiled graph cannot read (there it draws from the seed), so eager and compiled differ there
    dropped = pa.scaled_dot_product_attention(q, k, v, dropout_p=0.25,
                                              attn_mask=bias.sum() + torch.zeros(3, 5, dtype=F64),
                                              backend="reference")
    return [a, dropped, *joint, *per_peer]


def model_inputs():
    gen = torch.Generator().manual_seed(3)
    tensors = [rand(1, 2, 3, 4, gen=gen), rand(1, 2, 5, 4, gen=gen), rand(1, 2, 5, 3, gen=gen),
               rand(1, 2, 2, 4, gen=gen), rand(1, 2, 4, 4, gen=gen), rand(1, 2, 4, 3, gen=gen),
               torch.rand(2, 2, 1, 1, dtype=F64, generator=gen).requires_grad_(),
               rand(2, 2, 1, gen=gen)]
    return tensors + [torch.tensor([[4, 2]])]


def run_and_grad(fn, inputs):
    torch.manual_seed(0)
    outs = fn(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(outs)), leaves)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compile_backend):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    inputs = model_inputs()
    want, want_grads = run_and_grad(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    # inductor draws random numbers its own way unless told to fall back to eager's: the
    # dropout seed (a torch.randint) would differ, as torch's own dropout does under inductor;
    # no compile caches: a graph cached by an older version of the op's schema would be replayed
    with inductor_config.patch(fallback_random=True, force_disable_caches=True):
        got, got_grads = run_and_grad(compiled, inputs)
    for g, w in zip(got + list(got_grads), want + list(want_grads)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
    assert (got[1] - got[0]).abs().max() > 1e-3  # dropout did something


def test_compiled_graph_calls_the_registered_op():
    torch._dynamo.reset()
    seen = []

    def capture(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    q, k, v = base_qkv()
    compiled = torch.compile(lambda q, k, v: pa.peer_attention([q], [k], [v]), fullgraph=True,
                             backend=capture)
    torch.testing.assert_close(compiled(q, k, v)[0],
                               torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert any("peer_attention.torch_fwd" in s for s in seen), seen
