"""The compiled extension (CPU checks, run in CI without a GPU): built, importable, ops
registered for CUDA, and the backend says why it cannot run without a device."""
import importlib.util

import pytest
import torch

import peer_attention
from peer_attention import dispatch
from peer_attention.backends.cuda import CudaBackend, kernel_head_dim
from peer_attention.problem import AttentionProblem

BUILT = importlib.util.find_spec("peer_attention._C") is not None
needs_extension = pytest.mark.skipif(not BUILT, reason="peer_attention._C was not built "
                                     "(PEER_ATTENTION_BUILD_CUDA=0 or no CUDA toolkit)")


@needs_extension
def test_extension_imports_and_registers_cuda_kernels():
    from peer_attention import _C  # noqa: F401

    for op in ("peer_attention::cuda_fwd", "peer_attention::cuda_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_backend_reports_missing_device():
    assert peer_attention.available_backends()["cuda"] == "no CUDA device is visible"
    q = torch.randn(1, 1, 4, 8, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="no CUDA device is visible"):
        peer_attention.scaled_dot_product_attention(q, q, q, backend="cuda")


@pytest.mark.skipif(BUILT, reason="checks the message of a missing build")
def test_backend_reports_missing_extension():
    assert "peer_attention._C is not built" in peer_attention.available_backends()["cuda"]


def _problem(e=64, ev=64, requires_grad=False, **kw):
    q = torch.randn(1, 2, 5, e, dtype=torch.float16, requires_grad=requires_grad)
    k = torch.randn(1, 2, 5, e, dtype=torch.float16)
    v = torch.randn(1, 2, 5, ev, dtype=torch.float16)
    fields = dict(q=q, k=k, v=v, q_lens=(5,), kv_lens=(5,), peers=(1,), gate=None, bias=None,
                  kv_lengths=None, attn_mask=None, dropout_seed=None, dropout_p=0.0,
                  is_causal=False, scale=0.125, normalize="joint")
    fields.update(kw)
    return AttentionProblem(**fields)


def _problem_reasons(backend, problem):
    """The reasons about the problem itself: not the device, nor why the backend cannot run here."""
    unavailable = backend.unavailable_reason()
    return [r for r in backend.not_supported_reasons(problem) if "device" not in r and r != unavailable]


def test_capabilities_decline_dropout_float32_and_many_streams():
    backend = CudaBackend()
    float_mask = torch.zeros(1, 2, 5, 5, dtype=torch.float16, requires_grad=True)
    for mask in (torch.ones(1, 2, 5, 5, dtype=torch.bool), float_mask):
        assert _problem_reasons(backend, _problem(attn_mask=mask)) == []
    assert "dropout not supported" in backend.not_supported_reasons(_problem(dropout_p=0.1))
    q = torch.randn(1, 2, 5, 64)
    assert any("dtype" in r for r in backend.not_supported_reasons(_problem(q=q, k=q, v=q)))
    many = _problem(q_lens=(1,) * 17, kv_lens=(1,) * 17, peers=(1,) * 17 * 17)
    assert "17 streams > 16" in backend.not_supported_reasons(many)
    big = _problem(e=256, ev=256, requires_grad=True)
    assert _problem_reasons(backend, big) == []


def test_kernel_head_dims():
    assert [kernel_head_dim(_problem(e=e, ev=ev)) for e, ev in
            ((32, 32), (33, 8), (64, 80), (128, 128), (129, 8), (160, 152), (168, 8),
             (192, 192), (200, 8), (256, 256))] == [32, 64, 96, 128, 160, 160, 192, 192, 256, 256]


def test_auto_prefers_triton_until_cuda_is_validated_on_hardware():
    order = dispatch.SPEED_ORDER
    assert order.index("triton") < order.index("cuda") < order.index("reference")
