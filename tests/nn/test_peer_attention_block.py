"""PeerAttention against a plain-PyTorch composition of the same layers (float64)."""
import pytest
import torch
import torch.nn.functional as F

from peer_attention.nn import PeerAttention
from peer_attention.reference import peer_attention_reference

DIMS = (12, 20, 8)
LENGTHS = (5, 7, 3)


def make_inputs(batch=3, seed=0, dims=DIMS, lengths=LENGTHS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, d, generator=gen, dtype=torch.float64) for n, d in zip(lengths, dims)]


def randomize(module, seed=1):
    """Every parameter random (the zero-initialised gate layers included), so no term is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def composed(module, xs, kv_lengths=None):
    """The block written out with F.linear and the reference attention: (outputs, gates)."""
    h, hd, n = module.num_heads, module.head_dim, module.num_streams

    def heads(t):
        return t.view(t.shape[0], t.shape[1], h, hd).permute(0, 2, 1, 3)

    qs = [heads(F.linear(x, module.q_proj[s].weight, module.q_proj[s].bias)) for s, x in enumerate(xs)]
    ks = [heads(F.linear(x, module.k_proj[s].weight, module.k_proj[s].bias)) for s, x in enumerate(xs)]
    vs = [heads(F.linear(x, module.v_proj[s].weight, module.v_proj[s].bias)) for s, x in enumerate(xs)]
    gate = None
    if module.gating == "static":
        gate = torch.sigmoid(module.gate_logits)[None].expand(xs[0].shape[0], -1, -1, -1, -1)
    elif module.gating in ("peer", "self"):
        descs = []
        for s, x in enumerate(xs):  # mean over the valid tokens, one batch element at a time
            rows = []
            for b in range(x.shape[0]):
                valid = x.shape[1] if kv_lengths is None else int(kv_lengths[b, s])
                rows.append(x[b, :valid].mean(0) if valid > 0 else x.new_zeros(x.shape[2]))
            descs.append(F.linear(torch.stack(rows), module.descriptor_proj[s].weight,
                                  module.descriptor_proj[s].bias))
        gate = xs[0].new_zeros(xs[0].shape[0], n, n, h * hd)
        for s in range(n):
            for p in range(n):
                if module.gating == "peer":
                    mix = torch.softmax(module.mix_logits[s, p], 0)
                    source = sum(mix[q] * descs[q] for q in range(n))
                else:
                    source = descs[s]
                gate[:, s, p] = torch.sigmoid(source @ module.gate_weight[s, p].T + module.gate_bias[s, p])
        gate = gate.view(-1, n, n, h, hd)
    bias = None if module.peer_bias is None else module.peer_bias[None]
    peers = None if module.peers is None else [list(r) for r in module.peers]
    outs = peer_attention_reference(qs, ks, vs, peers=peers, gate=gate, bias=bias,
                                    normalize=module.normalize, is_causal=module.is_causal,
                                    kv_lengths=kv_lengths)
    outs = [F.linear(o.permute(0, 2, 1, 3).reshape(o.shape[0], o.shape[2], h * hd),
                     module.out_proj[s].weight, module.out_proj[s].bias) for s, o in enumerate(outs)]
    return outs, gate


CONFIGS = [
    dict(gating="peer"),
    dict(gating="self", is_causal=True),
    dict(gating="static", peers=[[1, 1, 0], [0, 1, 1], [1, 0, 1]]),
    dict(gating=None, qkv_bias=False),
    dict(gating="peer", normalize="peer", peer_bias=False),
    dict(gating="peer", head_dim=5, num_heads=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("padded", [False, True])
def test_matches_plain_composition(config, padded):
    config = dict(config)
    num_heads = config.pop("num_heads", 2)
    module = randomize(PeerAttention(DIMS, num_heads, dtype=torch.float64, **config))
    xs = make_inputs()
    kv_lengths = torch.tensor([[5, 7, 3], [2, 0, 3], [5, 4, 1]]) if padded else None
    got, got_gates = module(xs, kv_lengths=kv_lengths, return_gates=True)
    want, want_gates = composed(module, xs, kv_lengths)
    assert [g.shape for g in got] == [x.shape for x in xs]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    if want_gates is None:
        assert got_gates is None
    else:
        assert got_gates.shape == (3, 3, 3, module.num_heads, module.head_dim)
        torch.testing.assert_close(got_gates, want_gates, rtol=0, atol=1e-12)


def test_fresh_block_is_joint_attention_with_half_values():
    """The documented initialisation: gates sigmoid(0) = 0.5 everywhere, no peer log-prior."""
    module = PeerAttention(DIMS, 2, dtype=torch.float64)
    xs = make_inputs()
    outs, gates = module(xs, return_gates=True)
    assert torch.equal(gates, torch.full_like(gates, 0.5))
    plain = PeerAttention(DIMS, 2, gating=None, peer_bias=False, dtype=torch.float64)
    plain.load_state_dict(module.state_dict(), strict=False)
    with torch.no_grad():  # halving every value = halving v_proj (weight and bias)
        for proj in plain.v_proj:
            proj.weight.mul_(0.5)
            proj.bias.mul_(0.5)
    for got, want in zip(outs, plain(xs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gating", ["peer", "self", "static"])
def test_gradients_reach_every_parameter(gating):
    module = randomize(PeerAttention(DIMS, 2, gating=gating, dtype=torch.float64))
    xs = [x.requires_grad_() for x in make_inputs()]
    outs = module(xs, kv_lengths=torch.tensor([[5, 6, 3], [4, 7, 2], [1, 7, 3]]))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert all(x.grad.abs().sum() > 0 for x in xs)


def test_gates_come_from_peer_streams_and_differ_between_batch_elements():
    module = randomize(PeerAttention(DIMS, 2, gating="peer", dtype=torch.float64))
    xs = make_inputs()
    _, gates = module(xs, return_gates=True)
    assert (gates[0] - gates[1]).abs().max() > 1e-3  # per-example gates
    changed = list(xs)
    changed[2] = xs[2] + 1.0  # only the third stream's input moves
    _, gates_changed = module(changed, return_gates=True)
    # the connection 0 <- 1 does not involve stream 2, yet its weight follows stream 2's input
    assert (gates_changed[:, 0, 1] - gates[:, 0, 1]).abs().max() > 1e-3


def test_self_gates_follow_only_the_attending_stream():
    module = randomize(PeerAttention(DIMS, 2, gating="self", dtype=torch.float64))
    xs = make_inputs()
    _, gates = module(xs, return_gates=True)
    changed = list(xs)
    changed[2] = xs[2] + 1.0
    _, gates_changed = module(changed, return_gates=True)
    torch.testing.assert_close(gates_changed[:, :2], gates[:, :2], rtol=0, atol=0)
    assert (gates_changed[:, 2] - gates[:, 2]).abs().max() > 1e-3


def test_padding_tokens_change_nothing():
    module = randomize(PeerAttention(DIMS, 2, dtype=torch.float64))
    xs = make_inputs()
    kv_lengths = torch.tensor([[3, 7, 2], [5, 1, 3], [4, 4, 1]])
    outs, gates = module(xs, kv_lengths=kv_lengths, return_gates=True)
    noisy = []
    for s, x in enumerate(xs):
        pad = torch.arange(x.shape[1])[None, :, None] >= kv_lengths[:, s, None, None]
        noisy.append(torch.where(pad, x + 100.0, x))
    outs2, gates2 = module(noisy, kv_lengths=kv_lengths, return_gates=True)
    torch.testing.assert_close(gates2, gates, rtol=0, atol=1e-12)
    for s, (a, b) in enumerate(zip(outs, outs2)):
        for bi in range(3):  # valid query positions see exactly the same keys, values and gates
            n = int(kv_lengths[bi, s])
            torch.testing.assert_close(a[bi, :n], b[bi, :n], rtol=0, atol=1e-10)


def test_dropout_acts_on_the_output_projection_input_in_training_only():
    module = randomize(PeerAttention(DIMS, 2, dropout=0.5, dtype=torch.float64))
    xs = make_inputs()
    module.eval()
    want, _ = composed(module, xs)
    for g, w in zip(module(xs), want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    module.train()
    torch.manual_seed(0)
    dropped = module(xs)
    assert any((g - w).abs().max() > 1e-3 for g, w in zip(dropped, want))


def test_bad_arguments():
    with pytest.raises(ValueError, match="peer_bias"):
        PeerAttention(DIMS, 2, normalize="peer")
    with pytest.raises(ValueError, match="gating"):
        PeerAttention(DIMS, 2, gating="dynamic")
    with pytest.raises(ValueError, match="head_dim"):
        PeerAttention((4, 8), 8)
    with pytest.raises(ValueError, match="peers"):
        PeerAttention(DIMS, 2, peers=[[1, 1], [1, 1]])
    module = PeerAttention(DIMS, 2, dtype=torch.float64)
    xs = make_inputs()
    with pytest.raises(ValueError, match="expected 3 streams"):
        module(xs[:2])
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        module([xs[0], xs[2], xs[1]])
    with pytest.raises(TypeError, match="xs"):
        module(xs[0])


def test_torch_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    module = randomize(PeerAttention(DIMS, 2, dtype=torch.float32))
    xs = [x.float() for x in make_inputs()]
    kv_lengths = torch.tensor([[5, 6, 3], [4, 7, 2], [1, 7, 3]])

    def loss_fn(xs):
        return sum((o ** 2).sum() for o in module(xs, kv_lengths=kv_lengths))

    eager = loss_fn(xs)
    eager_grads = torch.autograd.grad(eager, list(module.parameters()))
    # aot_eager traces forward and backward through the registered ops' fake impls and autograd
    # formula in full graph; inductor's code generation adds nothing here but about a minute
    # of CPU (checked by hand: inductor compiles this model, forward and backward).
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(xs)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
