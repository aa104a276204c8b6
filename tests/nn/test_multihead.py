"""peer_attention.nn.MultiheadAttention against torch.nn.MultiheadAttention (float64)."""
import pytest
import torch

from tests.helpers import recorded_dispatch
from peer_attention.nn import MultiheadAttention

E, HEADS, N, L, S = 16, 4, 3, 5, 6
DT = torch.float64
# torch warns on a float mask next to a bool one; ours warns the same way
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def pair(**kwargs):
    """torch's module and ours with the same weights (ours loads torch's state_dict)."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, HEADS, dtype=DT, **kwargs)
    ours = MultiheadAttention(E, HEADS, dtype=DT, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def inputs(batch_first=False, kdim=E, vdim=E, unbatched=False, seed=1):
    gen = torch.Generator().manual_seed(seed)

    def make(length, width):
        shape = (length, width) if unbatched else ((N, length, width) if batch_first else (length, N, width))
        return torch.randn(shape, generator=gen, dtype=DT, requires_grad=True)

    return make(L, E), make(S, kdim), make(S, vdim)


def bool_mask(shape, seed=2):
    """Random True = masked entries; the first key always stays visible (no empty row)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < 0.4
    mask[..., 0] = False
    return mask


def float_mask(shape, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=DT)


def compare(theirs, ours, args, kwargs, expect_fused):
    with recorded_dispatch("output_and_backend") as calls:
        got_out, got_w = ours(*args, **kwargs)
    want_out, want_w = theirs(*args, **kwargs)
    assert bool(calls) == expect_fused, "the fused path runs exactly when need_weights=False"
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-10)
    if want_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-12)
    grad = torch.randn_like(want_out)
    leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    got_g = torch.autograd.grad(got_out, leaves + list(ours.parameters()), grad)
    want_g = torch.autograd.grad(want_out, leaves + list(theirs.parameters()), grad)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


CASES = {
    "plain": (dict(), dict()),
    "batch_first": (dict(batch_first=True), dict()),
    "key_padding_bool": (dict(), dict(key_padding_mask=bool_mask((N, S)))),
    "key_padding_float": (dict(), dict(key_padding_mask=float_mask((N, S)))),
    "attn_mask_bool_2d": (dict(), dict(attn_mask=bool_mask((L, S)))),
    "attn_mask_float_2d": (dict(), dict(attn_mask=float_mask((L, S)))),
    "attn_mask_float_3d": (dict(), dict(attn_mask=float_mask((N * HEADS, L, S)))),
    "both_masks": (dict(), dict(attn_mask=float_mask((L, S)), key_padding_mask=float_mask((N, S), 4))),
    "kdim_vdim": (dict(kdim=7, vdim=9), dict()),
    "add_bias_kv": (dict(add_bias_kv=True), dict(key_padding_mask=bool_mask((N, S)))),
    "add_zero_attn": (dict(add_zero_attn=True), dict(attn_mask=bool_mask((L, S)))),
    "bias_kv_and_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
                              dict(attn_mask=float_mask((L, S)), key_padding_mask=bool_mask((N, S)))),
    "no_bias": (dict(bias=False), dict()),
    "dropout_in_eval": (dict(dropout=0.5), dict()),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_matches_torch(case, need_weights, average):
    ctor, call = CASES[case]
    theirs, ours = pair(**ctor)
    theirs.eval(), ours.eval()
    q, k, v = inputs(ctor.get("batch_first", False), ctor.get("kdim", E), ctor.get("vdim", E))
    kwargs = dict(call, need_weights=need_weights, average_attn_weights=average)
    compare(theirs, ours, (q, k, v), kwargs, expect_fused=not need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_same_tensor(need_weights):
    theirs, ours = pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=DT, requires_grad=True)
    compare(theirs, ours, (x, x, x), dict(need_weights=need_weights), expect_fused=not need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_is_causal_hint(need_weights, padding):
    """torch: is_causal needs attn_mask; the kernel's causal mask replaces it only without a
    key_padding_mask and with need_weights=False."""
    theirs, ours = pair()
    q, k, v = inputs()
    k, v = k[:L].detach().requires_grad_(), v[:L].detach().requires_grad_()
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=DT)
    kwargs = dict(attn_mask=causal, is_causal=True, need_weights=need_weights)
    if padding:
        kwargs["key_padding_mask"] = bool_mask((N, L))
    compare(theirs, ours, (q, k, v), kwargs, expect_fused=not need_weights)


def test_is_causal_without_mask_is_an_error_as_in_torch():
    theirs, ours = pair()
    q, k, v = inputs()
    for module in (theirs, ours):
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            module(q, k, v, is_causal=True, need_weights=False)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", [None, "attn_3d", "padding"])
def test_unbatched(need_weights, mask):
    theirs, ours = pair(batch_first=True)  # batch_first is ignored for 2-D inputs
    q, k, v = inputs(unbatched=True)
    kwargs = dict(need_weights=need_weights)
    if mask == "attn_3d":
        kwargs["attn_mask"] = bool_mask((HEADS, L, S))
    if mask == "padding":
        kwargs["key_padding_mask"] = bool_mask((S,))
    compare(theirs, ours, (q, k, v), kwargs, expect_fused=not need_weights)


def test_dropout_with_weights_uses_the_same_random_numbers_as_torch():
    theirs, ours = pair(dropout=0.3)
    q, k, v = inputs()
    torch.manual_seed(7)
    want, want_w = theirs(q, k, v)
    torch.manual_seed(7)
    got, got_w = ours(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-12)


def test_fused_dropout_only_in_training():
    _, ours = pair(dropout=0.5)
    q, k, v = inputs()
    ours.eval()
    a, _ = ours(q, k, v, need_weights=False)
    b, _ = ours(q, k, v, need_weights=False)
    assert torch.equal(a, b)
    ours.train()
    torch.manual_seed(0)
    c, _ = ours(q, k, v, need_weights=False)
    assert (c - a).abs().max() > 1e-3


@pytest.mark.parametrize("ctor", [dict(), dict(kdim=7, vdim=9, add_bias_kv=True, bias=False)])
def test_same_parameters_and_state_dict_keys(ctor):
    theirs, ours = pair(**ctor)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    assert isinstance(ours, torch.nn.MultiheadAttention)
    # torch's module loads ours as well
    torch.nn.MultiheadAttention(E, HEADS, dtype=DT, **ctor).load_state_dict(ours.state_dict())


def test_bad_shapes_raise_like_torch():
    theirs, ours = pair()
    q, k, v = inputs()
    for module in (theirs, ours):
        with pytest.raises(AssertionError):
            module(q, k[:, :, :8], v)
        with pytest.raises(RuntimeError, match="2D attn_mask"):
            module(q, k, v, attn_mask=bool_mask((L + 1, S)))


def test_compiles_in_full_graph():
    theirs, ours = pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=DT)
    mask = bool_mask((N, L))

    def fn(x):
        return ours(x, x, x, key_padding_mask=mask, need_weights=False)[0]

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    want, _ = theirs(x, x, x, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
