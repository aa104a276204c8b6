"""Dropout in the Triton kernels (SDPA, one stream): Philox keep mask from the seed drawn from
torch's generator, regenerated in the backward. The mask is not the reference's, so it is tested
by reproducibility, keep rate, unbiasedness, and against the reference fed the kernel's own mask."""
import pytest
import torch

import peer_attention as pa
from peer_attention.api import sdpa_problem
from peer_attention.reference import sdpa_reference
from peer_attention.triton_kernels import dropout_keep_mask
from tests.helpers import assert_matches_reference

from .cases import DTYPES


def _inputs(gen, lead=(1, 2), q_len=9, kv_len=13, head_dim=20, value_dim=12, kv_heads=None):
    kv_lead = tuple(lead[:-1]) + (kv_heads or lead[-1],)
    return [torch.randn(*lead, q_len, head_dim, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(*kv_lead, kv_len, head_dim, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(*kv_lead, kv_len, value_dim, generator=gen, dtype=torch.float64).requires_grad_()]


def _kernel_keep_mask(q, k, v, p, seed, **kw):
    torch.manual_seed(seed)  # the API draws the Philox seed from torch's generator
    return dropout_keep_mask(sdpa_problem(q, k, v, dropout_p=p, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_dropout_matches_reference_fed_the_kernel_mask(dtype, gqa):
    p, seed = 0.3, 1234
    inputs = _inputs(torch.Generator().manual_seed(0), lead=(1, 2), kv_heads=1 if gqa else None)
    keep = _kernel_keep_mask(*(t.detach() for t in inputs), p, seed, enable_gqa=gqa)
    assert keep.shape == (1, 2, 9, 13) and not keep.all() and keep.any()

    def kernel_fn(q, k, v):
        torch.manual_seed(seed)
        return pa.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa, backend="triton")

    def reference_fn(q, k, v):
        return sdpa_reference(q, k, v, dropout_p=p, enable_gqa=gqa, dropout_mask=keep)

    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=["q", "k", "v"])


def test_same_seed_same_result_other_seed_other_result():
    q, k, v = (t.detach().float() for t in _inputs(torch.Generator().manual_seed(1)))

    def run(seed):
        torch.manual_seed(seed)
        return pa.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="triton")

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_keep_rate_and_the_mask_is_the_one_the_kernel_uses():
    """With v the identity, the output row is the dropped-out weight row itself:
    softmax * keep / (1 - p), so the helper's mask is exactly the kernel's."""
    p, seed, kv_len = 0.25, 99, 16
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 32, 16, generator=gen)
    k = torch.randn(2, 2, kv_len, 16, generator=gen)
    v = torch.eye(kv_len).expand(2, 2, kv_len, kv_len)
    keep = _kernel_keep_mask(q, k, v, p, seed)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.03, rate  # 2048 draws: std ~ 0.01
    torch.manual_seed(seed)
    out = pa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="triton")
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(out, weights * keep / (1 - p), atol=1e-5, rtol=1e-4)


def test_unbiased_over_seeds():
    """E[dropout output] = the output without dropout."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 4, 16, generator=gen), torch.randn(1, 1, 16, 16, generator=gen),
               torch.randn(1, 1, 16, 16, generator=gen))
    exact = pa.scaled_dot_product_attention(q, k, v, backend="triton")
    samples = []
    for seed in range(120):
        torch.manual_seed(seed)
        samples.append(pa.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="triton"))
    samples = torch.stack(samples)
    stderr = samples.std(0) / samples.shape[0] ** 0.5
    assert ((samples.mean(0) - exact).abs() <= 4.5 * stderr + 1e-6).all()
