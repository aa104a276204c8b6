"""Backend choice (SPEC section 5): available_backends, backend= / use_backend /
PEER_ATTENTION_BACKEND precedence, errors for unavailable backends, auto fallback, and the
capability table of a backend, seen through a fake backend plugged into the registry."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import peer_attention as pa
from peer_attention import api, dispatch, ops
from peer_attention.backends.base import UNAVAILABLE, Backend, Capabilities
from peer_attention.backends.reference import ReferenceBackend

F64 = torch.float64
FAKE = "testfake"


def qkv(hq=2, h=2, e=4, ev=4, dtype=F64):
    return (torch.randn(1, hq, 3, e, dtype=dtype), torch.randn(1, h, 5, e, dtype=dtype),
            torch.randn(1, h, 5, ev, dtype=dtype))


def two_streams(**kwargs):
    q, k, v = qkv()
    return api.peer_problem([q, q[:, :, :2]], [k, k[:, :, :1]], [v, v[:, :, :1]], **kwargs)


# ------------------------------------------------------------------------------------------
# available_backends
# ------------------------------------------------------------------------------------------

def test_available_backends_keys_and_reasons():
    available = pa.available_backends()
    assert sorted(available) == ["cuda", "reference", "torch", "triton"]
    assert list(available) == list(dispatch.SPEED_ORDER)  # listed in auto's order of preference
    assert available["reference"] is None
    for name, reason in available.items():
        assert reason is None or (isinstance(reason, str) and reason.strip()), name
    if not torch.cuda.is_available():
        assert available["cuda"] is not None
        assert "CUDA" in available["cuda"] or "_C" in available["cuda"]


def test_available_backends_is_a_copy():
    available = pa.available_backends()
    available["reference"] = "broken"
    assert pa.available_backends()["reference"] is None


# ------------------------------------------------------------------------------------------
# precedence of the request
# ------------------------------------------------------------------------------------------

@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_default_is_auto(no_env):
    assert dispatch.requested_backend(None) is None
    assert dispatch.requested_backend("auto") is None


def test_use_backend_nesting(no_env):
    with pa.use_backend("reference"):
        assert dispatch.requested_backend(None) == "reference"
        with pa.use_backend("cuda"):
            assert dispatch.requested_backend(None) == "cuda"
            assert dispatch.requested_backend("triton") == "triton"  # the keyword wins
            with pa.use_backend("auto"):
                assert dispatch.requested_backend(None) is None
            with pa.use_backend(None):
                assert dispatch.requested_backend(None) is None
            assert dispatch.requested_backend(None) == "cuda"
        assert dispatch.requested_backend(None) == "reference"
    assert dispatch.requested_backend(None) is None


def test_use_backend_restored_after_exception(no_env):
    with pytest.raises(RuntimeError):
        with pa.use_backend("cuda"):
            raise RuntimeError("boom")
    assert dispatch.requested_backend(None) is None


def test_env_var_is_the_lowest_precedence(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.requested_backend(None) == "triton"
    with pa.use_backend("reference"):
        assert dispatch.requested_backend(None) == "reference"
    assert dispatch.requested_backend("cuda") == "cuda"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.requested_backend(None) is None
    monkeypatch.setenv(dispatch.ENV_VAR, "")
    assert dispatch.requested_backend(None) is None


def test_env_var_bad_name(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "warp-drive")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        pa.scaled_dot_product_attention(*qkv())
    # an explicit choice does not read the variable
    pa.scaled_dot_product_attention(*qkv(), backend="reference")


def test_env_var_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    if pa.available_backends()["cuda"] is None:
        pytest.skip("cuda is available here")
    with pytest.raises(NotImplementedError, match="cuda"):
        pa.scaled_dot_product_attention(*qkv())


def test_use_backend_bad_name():
    with pytest.raises(ValueError, match="use_backend"):
        with pa.use_backend("nonesuch"):
            pass
    with pytest.raises(TypeError, match="use_backend"):
        with pa.use_backend(1):
            pass
    assert not dispatch._requested_stack


# ------------------------------------------------------------------------------------------
# explicit unavailable backends, auto fallback
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_explicit_unavailable_backend_lists_reasons(name, no_env):
    problem = api.sdpa_problem(*qkv())
    reasons = dispatch.BACKENDS[name].not_supported_reasons(problem)
    if not reasons:
        pytest.skip(f"{name} can serve CPU float64 here")
    with pytest.raises(NotImplementedError) as info:
        pa.scaled_dot_product_attention(*qkv(), backend=name)
    message = str(info.value)
    assert repr(name) in message
    for reason in reasons:
        assert reason in message
    with pytest.raises(NotImplementedError):
        with pa.use_backend(name):
            pa.peer_attention(*([t] for t in qkv()))


def test_cuda_reasons_name_the_device_and_dtype(no_env):
    problem = api.sdpa_problem(*qkv())
    reasons = dispatch.BACKENDS["cuda"].not_supported_reasons(problem)
    assert any("device 'cpu'" in r for r in reasons)
    assert any("float64" in r for r in reasons)


def test_auto_picks_torch_on_cpu_and_falls_back_to_reference(no_env):
    q, k, v = qkv()
    assert dispatch.select(api.sdpa_problem(q, k, v)).name == "torch"
    problem = two_streams(gate=torch.ones(4, dtype=F64), normalize="peer")
    assert dispatch.select(problem).name == "torch"
    _, name = dispatch.output_and_backend(api.sdpa_problem(q, k, v))
    assert name == "torch"
    auto = pa.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(auto, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    capped = api.sdpa_problem(q, k, v)._replace(softcap=5.0)  # torch's kernels cannot softcap
    assert dispatch.select(capped).name == "reference"


# ------------------------------------------------------------------------------------------
# a fake backend plugged into the registry
# ------------------------------------------------------------------------------------------

class FakeBackend(Backend):
    """Serves through the reference's kernels and records every call."""
    name = FAKE

    def __init__(self, capabilities, extra=()):
        self.capabilities = capabilities
        self.extra = list(extra)
        self.calls = []
        self._reference = ReferenceBackend()

    def extra_reasons(self, problem):
        return list(self.extra)

    def forward(self, problem):
        self.calls.append("forward")
        return self._reference.forward(problem)

    def backward(self, problem, grad_out, out, lse, needs_grad):
        self.calls.append("backward")
        return self._reference.backward(problem, grad_out, out, lse, needs_grad)


FULL = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({F64}))


_current_fake: list = []  # the kernels are registered once per process; they serve this one
_registered: list = []


@pytest.fixture
def fake(monkeypatch, no_env):
    backend = FakeBackend(FULL)
    if not _registered:
        ops.register_python_kernels(FAKE, lambda p: _current_fake[-1].forward(p),
                                    lambda *a: _current_fake[-1].backward(*a))
        _registered.append(True)
    _current_fake.append(backend)
    monkeypatch.setitem(dispatch.BACKENDS, FAKE, backend)
    monkeypatch.setitem(dispatch._ops, FAKE, ops.define_backend_ops(FAKE))
    monkeypatch.setitem(UNAVAILABLE, FAKE, None)
    monkeypatch.setattr(dispatch, "SPEED_ORDER", (FAKE,) + dispatch.SPEED_ORDER)
    yield backend
    _current_fake.pop()


def test_fake_backend_serves_forward_and_backward(fake):
    q, k, v = (t.requires_grad_() for t in qkv())
    out = pa.scaled_dot_product_attention(q, k, v, backend=FAKE)
    out.sum().backward()
    assert fake.calls == ["forward", "backward"]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_auto_takes_the_first_capable_backend(fake):
    q, k, v = qkv()
    pa.peer_attention([q], [k], [v])
    assert fake.calls == ["forward"]
    fake.capabilities = dataclasses.replace(FULL, gate=False)
    out = pa.peer_attention([q], [k], [v], gate=torch.ones(4, dtype=F64))  # the fake cannot
    assert fake.calls == ["forward"]  # served by the reference instead
    torch.testing.assert_close(out[0], torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with pytest.raises(NotImplementedError, match="gate not supported"):
        pa.peer_attention([q], [k], [v], gate=torch.ones(4, dtype=F64), backend=FAKE)
    with pa.use_backend(FAKE):
        with pytest.raises(NotImplementedError, match="gate not supported"):
            pa.peer_attention([q], [k], [v], gate=torch.ones(4, dtype=F64))


def test_unavailable_fake_is_skipped_by_auto(fake, monkeypatch):
    monkeypatch.setitem(UNAVAILABLE, FAKE, "the fake hardware is missing")
    q, k, v = qkv()
    pa.scaled_dot_product_attention(q, k, v)
    assert fake.calls == []
    with pytest.raises(NotImplementedError, match="the fake hardware is missing"):
        pa.scaled_dot_product_attention(q, k, v, backend=FAKE)


def test_extra_reasons_are_reported(fake):
    fake.extra = ["needs a full moon"]
    with pytest.raises(NotImplementedError, match="needs a full moon"):
        pa.scaled_dot_product_attention(*qkv(), backend=FAKE)


def _float_mask_problem(requires_grad):
    q, k, v = qkv()
    return api.sdpa_problem(q, k, v, attn_mask=torch.zeros(3, 5, dtype=F64,
                                                           requires_grad=requires_grad))


# capability -> (a limited table, a problem that needs the capability, a word of the reason)
CAPABILITY_CASES = {
    "devices": (dict(devices=frozenset({"cuda"})), lambda: api.sdpa_problem(*qkv()), "device"),
    "dtypes": (dict(dtypes=frozenset({torch.float16})), lambda: api.sdpa_problem(*qkv()),
               "dtype"),
    "max_head_dim_E": (dict(max_head_dim=8), lambda: api.sdpa_problem(*qkv(e=9, ev=4)), "E=9"),
    "max_head_dim_Ev": (dict(max_head_dim=8), lambda: api.sdpa_problem(*qkv(e=4, ev=9)),
                        "Ev=9"),
    "bool_mask": (dict(bool_mask=False),
                  lambda: api.sdpa_problem(*qkv(), attn_mask=torch.ones(3, 5, dtype=torch.bool)),
                  "bool attn_mask"),
    "float_mask": (dict(float_mask=False), lambda: _float_mask_problem(False), "float attn_mask"),
    "float_mask_grad": (dict(float_mask_grad=False), lambda: _float_mask_problem(True),
                        "gradient"),
    "dropout": (dict(dropout=False), lambda: api.sdpa_problem(*qkv(), dropout_p=0.1), "dropout"),
    "gqa": (dict(gqa=False), lambda: api.sdpa_problem(*qkv(hq=4, h=2), enable_gqa=True), "GQA"),
    "causal": (dict(causal=False), lambda: api.sdpa_problem(*qkv(), is_causal=True),
               "is_causal"),
    "gate": (dict(gate=False), lambda: two_streams(gate=torch.ones(4, dtype=F64)), "gate"),
    "bias": (dict(bias=False), lambda: two_streams(bias=torch.ones(2, dtype=F64)), "bias"),
    "kv_lengths": (dict(kv_lengths=False),
                   lambda: two_streams(kv_lengths=torch.tensor([[5, 1]])), "kv_lengths"),
    "max_streams": (dict(max_streams=1), lambda: two_streams(), "2 streams"),
    "normalize": (dict(normalize=frozenset({"joint"})), lambda: two_streams(normalize="peer"),
                  "normalize='peer'"),
}


@pytest.mark.parametrize("case", list(CAPABILITY_CASES))
def test_each_capability_flag_gives_a_reason(case, fake):
    limits, make_problem, word = CAPABILITY_CASES[case]
    problem = make_problem()
    assert fake.not_supported_reasons(problem) == []  # the full table serves it
    fake.capabilities = dataclasses.replace(FULL, **limits)
    reasons = fake.not_supported_reasons(problem)
    assert len(reasons) == 1 and word in reasons[0], reasons
    assert dispatch.select(problem).name == "torch"  # auto falls back (torch serves the CPU)
    with pytest.raises(NotImplementedError, match=word.replace("(", r"\(")):
        dispatch.select(problem, FAKE)


@pytest.mark.parametrize("case", list(CAPABILITY_CASES))
def test_limited_capability_does_not_block_problems_without_the_feature(case, fake):
    limits, _, _ = CAPABILITY_CASES[case]
    if case in ("devices", "dtypes"):
        pytest.skip("every problem has a device and a dtype")
    fake.capabilities = dataclasses.replace(FULL, **limits)
    plain = api.sdpa_problem(*qkv())
    assert fake.not_supported_reasons(plain) == []
    assert dispatch.select(plain).name == FAKE


def test_auto_never_picks_the_triton_interpreter_on_cpu(no_env):
    q, k, v = (t.float() for t in qkv())
    problem = api.sdpa_problem(q, k, v)
    assert dispatch.BACKENDS["triton"].capabilities.auto_devices == frozenset({"cuda"})
    assert dispatch.select(problem).name == "torch"
    if not dispatch.BACKENDS["triton"].not_supported_reasons(problem):  # interpreter on
        assert dispatch.select(problem, "triton").name == "triton"  # explicit still may


def test_auto_order_per_device_kind(monkeypatch, no_env):
    """AUTO_ORDER (set from the GPU check's bench) picks auto's order for a device kind; a kind
    without an entry keeps SPEED_ORDER."""
    assert dispatch.device_kind(torch.device("cpu")) == "cpu"
    assert dispatch.auto_order(torch.device("cpu")) == dispatch.SPEED_ORDER
    q, k, v = qkv()
    problem = api.sdpa_problem(q, k, v)
    served_by_default = dispatch.select(problem).name
    monkeypatch.setitem(dispatch.AUTO_ORDER, "sm90", ("reference",))  # another kind: no effect
    assert dispatch.select(problem).name == served_by_default
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("reference",))
    assert dispatch.auto_order(torch.device("cpu")) == ("reference",)
    assert served_by_default != "reference" and dispatch.select(problem).name == "reference"


def test_auto_order_entries_are_complete():
    """Every entry names known backends and ends with the reference, which serves everything."""
    for kind, order in dispatch.AUTO_ORDER.items():
        assert set(order) <= set(dispatch.BACKENDS) and order[-1] == "reference", kind
        assert len(set(order)) == len(order), kind
