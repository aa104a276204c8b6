"""The fixes of the static review of the CUDA backend that a CPU can check: what makes a call
need the backward, the deterministic-algorithms decline, bottom-right alignment claimed, and the
gradient of a broadcast 16-bit gate summed in float32 (SPEC section 8) on the CPU backends.
The kernels themselves are checked on a GPU (tests/cuda/test_kernels.py, tests/gpu/)."""
import importlib.util

import pytest
import torch

import peer_attention
from peer_attention.backends.cuda import CudaBackend, _needs_backward, atomic_gradients
from peer_attention.reference import peer_attention_reference
from tests.helpers import assert_matches_reference

from .test_extension import _problem, _problem_reasons


def test_needs_backward_sees_every_input_that_can_take_a_gradient():
    assert not _needs_backward(_problem())
    assert _needs_backward(_problem(requires_grad=True))
    mask = torch.zeros(1, 2, 5, 5, dtype=torch.float16, requires_grad=True)
    assert _needs_backward(_problem(attn_mask=mask))
    sinks = torch.zeros(2, requires_grad=True)
    assert _needs_backward(_problem(sinks=sinks))
    with torch.no_grad():
        assert not _needs_backward(_problem(attn_mask=mask))


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _gqa_problem(requires_grad):
    q = torch.randn(1, 4, 5, 64, dtype=torch.float16, requires_grad=requires_grad)
    kv = torch.randn(1, 2, 5, 64, dtype=torch.float16, requires_grad=requires_grad)
    return _problem(q=q, k=kv, v=kv)


def test_atomic_gradients_named():
    gate = torch.ones(1, 1, 1, 2, 64, requires_grad=True)
    bias = torch.zeros(1, 1, 1, 2, requires_grad=True)
    assert atomic_gradients(_problem(gate=gate, bias=bias)) == ["gate", "bias"]
    assert atomic_gradients(_gqa_problem(True)) == ["GQA key/value"]
    assert atomic_gradients(_problem(requires_grad=True)) == []


def test_deterministic_algorithms_decline_only_the_atomic_backward(deterministic):
    backend = CudaBackend()
    gate = torch.ones(1, 1, 1, 2, 64, requires_grad=True)
    reasons = _problem_reasons(backend, _problem(gate=gate))
    assert len(reasons) == 1 and "deterministic" in reasons[0] and "gate" in reasons[0]
    assert any("GQA" in r for r in _problem_reasons(backend, _gqa_problem(True)))
    # forward only, or a backward without atomics: served
    assert _problem_reasons(backend, _gqa_problem(False)) == []
    assert _problem_reasons(backend, _problem(requires_grad=True)) == []
    with torch.no_grad():
        assert _problem_reasons(backend, _problem(gate=gate)) == []


def test_no_decline_without_deterministic_algorithms():
    gate = torch.ones(1, 1, 1, 2, 64, requires_grad=True)
    assert not torch.are_deterministic_algorithms_enabled()
    assert _problem_reasons(CudaBackend(), _problem(gate=gate)) == []


def test_bottom_right_causal_is_served_other_variants_declined():
    backend = CudaBackend()
    assert _problem_reasons(backend, _problem(is_causal=True, bottom_right=True)) == []
    assert _problem_reasons(backend, _problem(window_left=4, window_right=0)) == [
        "sliding window not supported"]
    assert _problem_reasons(backend, _problem(softcap=30.0)) == ["softcap not supported"]


# --- the broadcast-gate gradient on the CPU path ---------------------------------------------

def _broadcast_gate_case(backend, B=2, Hq=2, E=32, Ev=64, lens=(16, 16), seed=0):
    """Two streams and a gate of shape (1, 2, 2, 1, 1): each of its 4 entries sums B * Hq * Ev
    = 256 terms of the expanded gradient."""
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.randn(B, Hq, n, E, dtype=torch.float64, generator=gen) for n in lens]
    ks = [torch.randn(B, Hq, n, E, dtype=torch.float64, generator=gen) for n in lens]
    vs = [torch.randn(B, Hq, n, Ev, dtype=torch.float64, generator=gen) for n in lens]
    gate = torch.rand(1, 2, 2, 1, 1, dtype=torch.float64, generator=gen) + 0.5
    inputs = [t.requires_grad_(False) for t in qs + ks + vs] + [gate.requires_grad_(True)]

    def kernel(*args):
        return peer_attention.peer_attention(args[0:2], args[2:4], args[4:6], gate=args[6],
                                             backend=backend)

    def reference(*args):
        return peer_attention_reference(args[0:2], args[2:4], args[4:6], gate=args[6])

    return kernel, reference, inputs


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp16_broadcast_gate_gradient_within_spec_bound(backend):
    if backend == "triton" and peer_attention.available_backends()["triton"]:
        pytest.skip(peer_attention.available_backends()["triton"])
    kernel, reference, inputs = _broadcast_gate_case(backend)
    assert_matches_reference(kernel, reference, inputs, torch.float16, names=["gate"])


def test_broadcast_gate_gradient_keeps_the_gate_dtype():
    kernel, _, inputs = _broadcast_gate_case("reference")
    args = [t.detach().half().requires_grad_(t.requires_grad) for t in inputs]
    outs = kernel(*args)
    (grad,) = torch.autograd.grad(sum(o.float().sum() for o in outs), [args[6]])
    assert grad.dtype == torch.float16 and grad.shape == (1, 2, 2, 1, 1)



@pytest.mark.skipif(importlib.util.find_spec("peer_attention._C") is None,
                    reason="peer_attention._C was not built")
def test_extension_exposes_the_kernel_image_probe():
    from peer_attention import _C

    assert callable(_C.kernel_image_error)  # backends/cuda.py asks it per device
