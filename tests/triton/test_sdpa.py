"""The drop-in (one stream) through backend="triton": forward and backward against the
reference under SPEC section 8, every dtype."""
import pytest
import torch

from tests.helpers import assert_matches_reference

from .cases import DTYPES, peer_case, sdpa_case


def _bool_mask(gen, shape, p_keep=0.6):
    return torch.rand(*shape, generator=gen) < p_keep


def _float_mask(gen, shape, requires_grad):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)


def _float_mask_with_inf_rows(gen):
    mask = torch.randn(1, 2, 5, 7, generator=gen, dtype=torch.float64)
    mask[0, 0, 1] = float("-inf")  # a row with nothing to attend to
    mask[0, 1, :, 3] = float("-inf")
    return mask.requires_grad_()


G = torch.Generator().manual_seed(1)
SCENARIOS = {
    "odd-sizes": dict(q_len=5, kv_len=7),
    "long-tiles": dict(q_len=33, kv_len=40, head_dim=16, value_dim=16),
    "causal-L<M": dict(q_len=5, kv_len=23, is_causal=True),
    "causal-L>M": dict(q_len=23, kv_len=6, is_causal=True),
    "gqa": dict(q_len=9, kv_len=11, lead=(2, 4), kv_heads=2),
    "extra-lead-dims": dict(q_len=6, kv_len=5, lead=(2, 1, 2)),
    "bool-mask-broadcast": dict(q_len=7, kv_len=18, mask=_bool_mask(G, (1, 1, 7, 18))),
    "float-mask-grad": dict(q_len=7, kv_len=9, lead=(2, 2), mask=_float_mask(G, (2, 2, 7, 9), True)),
    "float-mask-broadcast": dict(q_len=6, kv_len=9, lead=(2, 2), mask=_float_mask(G, (2, 1, 1, 9), True)),
    "head-dims-pow2-large": dict(q_len=4, kv_len=6, head_dim=64, value_dim=33),
    "head-dims-256": dict(q_len=3, kv_len=5, head_dim=256, value_dim=256),
    "bool-mask-gqa-batch": dict(q_len=6, kv_len=9, lead=(2, 4), kv_heads=2,
                                mask=_bool_mask(G, (2, 4, 6, 9))),
    "float-mask-with-masked-rows": dict(q_len=5, kv_len=7, mask=_float_mask_with_inf_rows(G)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sdpa_matches_reference(name, dtype):
    kernel_fn, reference_fn, inputs, names = sdpa_case(**SCENARIOS[name])
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)


def test_fully_masked_rows_give_zero_and_zero_grads():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(1, 2, 6, 7, generator=gen) < 0.5
    mask[:, :, 2] = False  # rows with nothing to attend to
    kernel_fn, reference_fn, inputs, names = sdpa_case(q_len=6, kv_len=7, mask=mask)
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)
    q, k, v = (t.detach().float().requires_grad_() for t in inputs[:3])
    out = kernel_fn(q, k, v, mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


def test_empty_query():
    # one stream through peer_attention: sdpa_reference cannot reshape a 0-length query
    kernel_fn, reference_fn, inputs, names = peer_case(q_lens=[0], kv_lens=[5])
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)


def test_no_keys_gives_zero_output_and_zero_grads():
    # (the reference's softmax cannot reduce over 0 keys, so this one is checked directly)
    kernel_fn, _, inputs, _ = sdpa_case(q_len=4, kv_len=0)
    q, k, v = (t.detach().float().requires_grad_() for t in inputs)
    out = kernel_fn(q, k, v)
    assert out.shape == (1, 2, 4, 12) and torch.equal(out, torch.zeros_like(out))
    out.backward(torch.randn_like(out))
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape


def test_strided_inputs_are_read_in_place():
    """(B, L, H, E) memory seen as (B, H, L, E): the transposed views reach the kernel as they
    are (the helper's dtype casts preserve strides) and give the reference's numbers."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 9, 3, 20, generator=gen, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(2, 11, 3, 20, generator=gen, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(2, 3, 12, 11, generator=gen, dtype=torch.float64).transpose(-1, -2)
    kernel_fn, reference_fn, _, names = sdpa_case(q_len=9, kv_len=11, lead=(2, 3))

    def strided_kernel_fn(q_, k_, v_):
        assert not (q_.is_contiguous() or k_.is_contiguous() or v_.is_contiguous())
        return kernel_fn(q_, k_, v_)

    inputs = [t.requires_grad_() for t in (q, k, v)]
    for dtype in (torch.float32, torch.float16):
        assert_matches_reference(strided_kernel_fn, reference_fn, inputs, dtype, names=names)
