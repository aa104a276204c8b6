"""SPEC section 4: every bad argument raises the right exception, with a message that names the
argument, before anything is computed; the caller's tensors are never modified."""
from __future__ import annotations

import math

import pytest
import torch

import peer_attention as pa
from peer_attention import dispatch

F64 = torch.float64


def t(*shape, dtype=F64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def sdpa_args(**overrides):
    args = dict(query=t(2, 4, 3, 5), key=t(2, 4, 6, 5), value=t(2, 4, 6, 7))
    args.update(overrides)
    return args


def peer_args(**overrides):
    args = dict(queries=[t(2, 4, 3, 5), t(2, 4, 2, 5)], keys=[t(2, 2, 6, 5), t(2, 2, 1, 5)],
                values=[t(2, 2, 6, 7), t(2, 2, 1, 7)], enable_gqa=True)
    args.update(overrides)
    return args


def with_stream(name, index, tensor, **overrides):
    args = peer_args(**overrides)
    args[name] = list(args[name])
    args[name][index] = tensor
    return args


def call_sdpa(args):
    args = dict(args)
    return pa.scaled_dot_product_attention(args.pop("query"), args.pop("key"), args.pop("value"),
                                           **args)


def call_peer(args):
    args = dict(args)
    return pa.peer_attention(args.pop("queries"), args.pop("keys"), args.pop("values"), **args)


META = "meta"

# (id, args, exception type, the argument name the message must contain)
SDPA_CASES = [
    ("query_not_tensor", sdpa_args(query=[[1.0]]), TypeError, "query"),
    ("key_not_tensor", sdpa_args(key=None), TypeError, "key"),
    ("value_not_tensor", sdpa_args(value=3.0), TypeError, "value"),
    ("mask_not_tensor", sdpa_args(attn_mask=[[True]]), TypeError, "attn_mask"),
    ("query_int_dtype", sdpa_args(query=torch.ones(2, 4, 3, 5, dtype=torch.int64)), TypeError,
     "query"),
    ("key_dtype_mismatch", sdpa_args(key=t(2, 4, 6, 5, dtype=torch.float32)), TypeError, "key"),
    ("value_dtype_mismatch", sdpa_args(value=t(2, 4, 6, 7, dtype=torch.float16)), TypeError,
     "value"),
    ("key_device_mismatch", sdpa_args(key=t(2, 4, 6, 5, device=META)), ValueError, "key"),
    ("value_device_mismatch", sdpa_args(value=t(2, 4, 6, 7, device=META)), ValueError, "value"),
    ("mask_device_mismatch", sdpa_args(attn_mask=torch.ones(3, 6, dtype=torch.bool, device=META)),
     ValueError, "attn_mask"),
    ("query_too_few_dims", sdpa_args(query=t(5), key=t(6, 5), value=t(6, 7)), ValueError,
     "query"),
    ("key_leading_dims_differ", sdpa_args(key=t(3, 4, 6, 5), value=t(3, 4, 6, 7)), ValueError,
     "key"),
    ("key_head_dim_differs", sdpa_args(key=t(2, 4, 6, 4)), ValueError, "key"),
    ("value_length_differs", sdpa_args(value=t(2, 4, 5, 7)), ValueError, "value"),
    ("value_heads_differ", sdpa_args(value=t(2, 2, 6, 7)), ValueError, "value"),
    ("heads_differ_without_gqa", sdpa_args(key=t(2, 2, 6, 5), value=t(2, 2, 6, 7)), ValueError,
     ("key", "enable_gqa")),
    ("heads_not_multiple", sdpa_args(key=t(2, 3, 6, 5), value=t(2, 3, 6, 7), enable_gqa=True),
     ValueError, ("key", "Hq=4", "H=3")),
    ("dropout_above_one", sdpa_args(dropout_p=1.5), ValueError, "dropout_p"),
    ("dropout_nan", sdpa_args(dropout_p=float("nan")), ValueError, "dropout_p"),
    ("dropout_str", sdpa_args(dropout_p="0.1"), TypeError, "dropout_p"),
    ("scale_inf", sdpa_args(scale=math.inf), ValueError, "scale"),
    ("scale_nan", sdpa_args(scale=float("nan")), ValueError, "scale"),
    ("scale_str", sdpa_args(scale="1"), TypeError, "scale"),
    ("mask_with_causal", sdpa_args(attn_mask=torch.ones(3, 6, dtype=torch.bool), is_causal=True),
     ValueError, ("attn_mask", "is_causal")),
    ("mask_int_dtype", sdpa_args(attn_mask=torch.ones(3, 6, dtype=torch.int32)), TypeError,
     "attn_mask"),
    ("mask_float_dtype_differs", sdpa_args(attn_mask=torch.zeros(3, 6, dtype=torch.float16)),
     TypeError, "attn_mask"),
    ("nested_query", sdpa_args(query=torch.nested.nested_tensor(
        [t(4, 3, 5), t(4, 2, 5)], layout=torch.jagged)), TypeError, "query"),
    ("mask_not_broadcastable", sdpa_args(attn_mask=torch.ones(3, 5, dtype=torch.bool)),
     ValueError, "attn_mask"),
    ("mask_too_many_dims", sdpa_args(attn_mask=torch.ones(1, 2, 4, 3, 6, dtype=torch.bool)),
     ValueError, "attn_mask"),
    ("is_causal_not_bool", sdpa_args(is_causal="yes"), TypeError, "is_causal"),
    ("enable_gqa_not_bool", sdpa_args(enable_gqa=None), TypeError, "enable_gqa"),
]

PEER_CASES = [
    ("queries_is_a_tensor", peer_args(queries=t(2, 4, 3, 5)), TypeError, "queries"),
    ("keys_not_a_list", peer_args(keys=None), TypeError, "keys"),
    ("stream_not_tensor", with_stream("values", 1, "v"), TypeError, "values[1]"),
    ("no_streams", peer_args(queries=[], keys=[], values=[]), ValueError, "queries"),
    ("lists_of_different_lengths", peer_args(keys=[t(2, 2, 6, 5)]), ValueError, "keys"),
    ("values_list_shorter", peer_args(values=[t(2, 2, 6, 7)]), ValueError, "values"),
    ("batch_mismatch", with_stream("queries", 1, t(3, 4, 2, 5)), ValueError, "queries[1]"),
    ("query_heads_mismatch", with_stream("queries", 1, t(2, 2, 2, 5)), ValueError, "queries[1]"),
    ("key_heads_mismatch", with_stream("keys", 1, t(2, 4, 1, 5)), ValueError, "keys[1]"),
    ("key_head_dim_mismatch", with_stream("keys", 1, t(2, 2, 1, 4)), ValueError, "keys[1]"),
    ("key_batch_mismatch", with_stream("keys", 0, t(1, 2, 6, 5)), ValueError, "keys[0]"),
    ("value_dim_mismatch", with_stream("values", 1, t(2, 2, 1, 6)), ValueError, "values[1]"),
    ("value_length_mismatch", with_stream("values", 1, t(2, 2, 2, 7)), ValueError, "values[1]"),
    ("query_not_4d", with_stream("queries", 0, t(4, 3, 5)), ValueError, "queries[0]"),
    ("dtype_mismatch", with_stream("keys", 1, t(2, 2, 1, 5, dtype=torch.float32)), TypeError,
     "keys[1]"),
    ("int_queries", with_stream("queries", 0, torch.ones(2, 4, 3, 5, dtype=torch.int64)),
     TypeError, "queries[0]"),
    ("device_mismatch", with_stream("values", 1, t(2, 2, 1, 7, device=META)), ValueError,
     "values[1]"),
    ("heads_not_multiple", peer_args(keys=[t(2, 3, 6, 5), t(2, 3, 1, 5)],
                                     values=[t(2, 3, 6, 7), t(2, 3, 1, 7)]), ValueError,
     ("keys", "Hq=4", "H=3")),
    ("heads_differ_without_gqa", peer_args(enable_gqa=False), ValueError, ("keys", "enable_gqa")),
    ("peers_tensor_not_SxS", peer_args(peers=torch.ones(2, 3, dtype=torch.bool)), ValueError,
     "peers"),
    ("peers_tensor_not_bool", peer_args(peers=torch.ones(2, 2)), TypeError, "peers"),
    ("peers_wrong_rows", peer_args(peers=[[True, True]]), ValueError, "peers"),
    ("peers_wrong_row_length", peer_args(peers=[[True, True], [True]]), ValueError, "peers[1]"),
    ("peers_entry_not_bool", peer_args(peers=[[True, 2], [True, True]]), TypeError, "peers[0][1]"),
    ("peers_not_a_table", peer_args(peers="all"), ValueError, "peers"),
    ("gate_not_broadcastable", peer_args(gate=torch.ones(2, 3, 2, 4, 7, dtype=F64)), ValueError,
     "gate"),
    ("gate_last_dim_wrong", peer_args(gate=torch.ones(5, dtype=F64)), ValueError, "gate"),
    ("gate_too_many_dims", peer_args(gate=torch.ones(1, 2, 2, 2, 4, 7, dtype=F64)), ValueError,
     "gate"),
    ("gate_not_tensor", peer_args(gate=0.5), TypeError, "gate"),
    ("gate_int_dtype", peer_args(gate=torch.ones(7, dtype=torch.int64)), TypeError, "gate"),
    ("gate_device_mismatch", peer_args(gate=torch.ones(7, dtype=F64, device=META)), ValueError,
     "gate"),
    ("bias_not_broadcastable", peer_args(bias=torch.ones(2, 3, 4, dtype=F64)), ValueError, "bias"),
    ("bias_hq_wrong", peer_args(bias=torch.ones(3, dtype=F64)), ValueError, "bias"),
    ("bias_with_peer_normalize", peer_args(bias=torch.ones(1, dtype=F64), normalize="peer"),
     ValueError, ("bias", "normalize='peer'")),
    ("bias_int_dtype", peer_args(bias=torch.ones(4, dtype=torch.int32)), TypeError, "bias"),
    ("bias_device_mismatch", peer_args(bias=torch.ones(4, dtype=F64, device=META)), ValueError,
     "bias"),
    ("unknown_normalize", peer_args(normalize="softmax"), ValueError, "normalize"),
    ("normalize_not_str", peer_args(normalize=None), ValueError, "normalize"),
    ("scale_inf", peer_args(scale=-math.inf), ValueError, "scale"),
    ("scale_nan", peer_args(scale=float("nan")), ValueError, "scale"),
    ("kv_lengths_too_large", peer_args(kv_lengths=torch.tensor([[6, 1], [6, 2]])), ValueError,
     "kv_lengths"),
    ("kv_lengths_negative", peer_args(kv_lengths=torch.tensor([[6, 1], [-1, 1]])), ValueError,
     "kv_lengths"),
    ("kv_lengths_wrong_shape", peer_args(kv_lengths=torch.tensor([6, 1])), ValueError,
     "kv_lengths"),
    ("kv_lengths_transposed", peer_args(kv_lengths=torch.ones(2, 3, dtype=torch.int64)),
     ValueError, "kv_lengths"),
    ("kv_lengths_float", peer_args(kv_lengths=torch.ones(2, 2)), TypeError, "kv_lengths"),
    ("kv_lengths_bool", peer_args(kv_lengths=torch.ones(2, 2, dtype=torch.bool)), TypeError,
     "kv_lengths"),
    ("kv_lengths_not_tensor", peer_args(kv_lengths=[[1, 1], [1, 1]]), TypeError, "kv_lengths"),
    ("kv_lengths_other_device", peer_args(kv_lengths=torch.ones(2, 2, dtype=torch.int64,
                                                                device=META)),
     ValueError, "kv_lengths"),
    ("is_causal_not_bool", peer_args(is_causal=1), TypeError, "is_causal"),
]


def assert_names(exc, names):
    """The message names the argument before its first colon and contains every expected
    fragment."""
    names = (names,) if isinstance(names, str) else names
    message = str(exc)
    assert names[0] in message.split(":", 1)[0], message
    for fragment in names[1:]:
        assert fragment in message, message


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail loudly if a bad call gets as far as dispatch."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("dispatch.output_and_backend was reached on bad input")

    monkeypatch.setattr(dispatch, "output_and_backend", spy)
    yield calls
    assert not calls


@pytest.mark.parametrize("args,error,name", [c[1:] for c in SDPA_CASES],
                         ids=[c[0] for c in SDPA_CASES])
def test_sdpa_bad_input(args, error, name, nothing_runs):
    with pytest.raises(error) as info:
        call_sdpa(args)
    assert_names(info.value, name)


@pytest.mark.parametrize("args,error,name", [c[1:] for c in PEER_CASES],
                         ids=[c[0] for c in PEER_CASES])
def test_peer_bad_input(args, error, name, nothing_runs):
    with pytest.raises(error) as info:
        call_peer(args)
    assert_names(info.value, name)


BACKEND_CASES = [
    ("sdpa_unknown", call_sdpa, sdpa_args(backend="fastest"), ValueError),
    ("sdpa_not_str", call_sdpa, sdpa_args(backend=3), TypeError),
    ("peer_unknown", call_peer, peer_args(backend="gpu"), ValueError),
]


@pytest.mark.parametrize("call,args,error", [c[1:] for c in BACKEND_CASES],
                         ids=[c[0] for c in BACKEND_CASES])
def test_bad_backend_name_runs_no_op(call, args, error, monkeypatch):
    """The backend name is checked by dispatch, before any registered op is called."""
    def no_op(name):
        raise AssertionError(f"the op of backend {name!r} was looked up on bad input")

    monkeypatch.setattr(dispatch, "forward_op", no_op)
    with pytest.raises(error, match="backend"):
        call(args)


def test_messages_say_expected_and_actual():
    with pytest.raises(ValueError) as info:
        call_peer(peer_args(gate=torch.ones(2, 3, 2, 4, 7, dtype=F64)))
    assert "(2, 2, 2, 4, 7)" in str(info.value) and "(2, 3, 2, 4, 7)" in str(info.value)
    with pytest.raises(TypeError) as info:
        call_sdpa(sdpa_args(key=t(2, 4, 6, 5, dtype=torch.float32)))
    assert "float64" in str(info.value) and "float32" in str(info.value)
    with pytest.raises(ValueError) as info:
        call_sdpa(sdpa_args(key=t(2, 4, 6, 5, device=META)))
    assert "cpu" in str(info.value) and "meta" in str(info.value)
    with pytest.raises(ValueError) as info:
        call_peer(peer_args(kv_lengths=torch.tensor([[6, 1], [6, 2]])))
    assert "kv_lengths[1, 1] = 2" in str(info.value)


def test_good_arguments_pass():
    """The fixtures above are valid apart from the one bad argument of each case."""
    call_sdpa(sdpa_args())
    call_peer(peer_args(gate=torch.ones(7, dtype=F64), bias=torch.ones(4, dtype=F64),
                        kv_lengths=torch.tensor([[6, 1], [0, 0]]), peers=[[True, False], [1, 1]]))
    call_sdpa(sdpa_args(attn_mask=torch.zeros(3, 6, dtype=F64), dropout_p=0.5, scale=2))


# ------------------------------------------------------------------------------------------
# inputs are never modified
# ------------------------------------------------------------------------------------------

def snapshot(tensors):
    return [(x, x._version, x.detach().clone()) for x in tensors]


def assert_unchanged(snap):
    for i, (x, version, copy) in enumerate(snap):
        assert x._version == version, f"input {i} was written to"
        assert torch.equal(x.detach(), copy), f"input {i} changed"


def test_sdpa_does_not_modify_inputs():
    q, k, v = (x.requires_grad_() for x in (t(2, 4, 3, 5), t(2, 4, 6, 5), t(2, 4, 6, 7)))
    mask = torch.randn(4, 3, 6, dtype=F64, requires_grad=True)
    snap = snapshot([q, k, v, mask])
    out = pa.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    out.square().sum().backward()
    assert_unchanged(snap)
    bool_mask = torch.rand(3, 6) > 0.5
    snap = snapshot([q, k, v, bool_mask])
    pa.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask).sum().backward()
    assert_unchanged(snap)


@pytest.mark.parametrize("normalize", ["joint", "peer"])
def test_peer_attention_does_not_modify_inputs(normalize):
    args = peer_args(normalize=normalize, is_causal=True)
    streams = [x.requires_grad_() for name in ("queries", "keys", "values") for x in args[name]]
    gate = torch.rand(1, 2, 2, 1, 7, dtype=F64, requires_grad=True)
    bias = torch.randn(2, 1, dtype=F64, requires_grad=True)
    kv_lengths = torch.tensor([[6, 1], [3, 0]], dtype=torch.int32)
    peers = torch.tensor([[True, True], [False, True]])
    snap = snapshot(streams + [gate, kv_lengths, peers] + ([bias] if normalize == "joint" else []))
    extra = {"bias": bias} if normalize == "joint" else {}
    outs = call_peer(dict(args, gate=gate, kv_lengths=kv_lengths, peers=peers, **extra))
    sum(o.square().sum() for o in outs).backward()
    assert_unchanged(snap)


def test_bad_input_leaves_inputs_alone():
    args = peer_args(kv_lengths=torch.tensor([[6, 9], [0, 0]]), gate=torch.ones(7, dtype=F64))
    snap = snapshot(args["queries"] + args["keys"] + args["values"]
                    + [args["kv_lengths"], args["gate"]])
    with pytest.raises(ValueError, match="kv_lengths"):
        call_peer(args)
    assert_unchanged(snap)


# ---- dropout_p in every entry point that takes it (issue 20): torch's RuntimeError type too ----

def _flash(p):
    q = t(1, 3, 2, 4, dtype=torch.float32)
    return pa.flash_attn_func(q, q, q, dropout_p=p)


def _varlen(p):
    q = t(5, 2, 4, dtype=torch.float32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    return pa.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, dropout_p=p)


def _multihead(p):
    from peer_attention.nn import MultiheadAttention

    module = MultiheadAttention(8, 2, dropout=p, batch_first=True)  # torch's accepts any p here
    x = torch.randn(2, 3, 8)
    return module(x, x, x, need_weights=False)  # training mode: dropout reaches the SDPA call


def _transformers(p):
    from peer_attention.integrations.transformers import peer_attention_forward

    q = torch.randn(1, 2, 3, 4)
    return peer_attention_forward(torch.nn.Module(), q, q, q, None, dropout=p)


def _transformers_variants(p):
    from peer_attention.integrations.transformers import variants_forward

    q = torch.randn(1, 2, 3, 4)
    return variants_forward(torch.nn.Module(), q, q, q, None, dropout=p, softcap=5.0)


DROPOUT_ENTRY_POINTS = {"flash_attn_func": _flash, "flash_attn_varlen_func": _varlen,
                        "MultiheadAttention": _multihead, "transformers": _transformers,
                        "transformers_variants": _transformers_variants}


@pytest.mark.parametrize("dropout_p", [-0.1, 1.5, float("nan")], ids=str)
@pytest.mark.parametrize("entry", sorted(DROPOUT_ENTRY_POINTS))
def test_every_entry_point_rejects_dropout_outside_the_unit_interval(entry, dropout_p):
    for error in (ValueError, RuntimeError):  # ours names the argument; torch raises RuntimeError
        with pytest.raises(error, match="dropout_p"):
            DROPOUT_ENTRY_POINTS[entry](dropout_p)
