"""Both load paths of the kernels against the reference: tensor descriptors (TMA; chosen when
rows and bases are 16-byte aligned with the last dim contiguous) and masked pointer loads (any
other strides), for Q/K/V/O and the attn_mask alike."""
import pytest
import torch

from peer_attention.problem import AttentionProblem
from peer_attention.triton_kernels.fwd import mask_for_kernel, mask_tma_ok, use_tma
from tests.helpers import assert_matches_reference

from .cases import sdpa_case


def _chosen_paths(q, k, v, mask):
    problem = AttentionProblem(q, k, v, (q.shape[2],), (k.shape[2],), (1,), None, None, None,
                               mask, None, 0.0, False, 1.0, "joint")
    out = q.new_empty(q.shape[:3] + (v.shape[-1],))
    return use_tma(problem, out), mask_tma_ok(mask_for_kernel(mask))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("aligned", [True, False], ids=["descriptors", "pointers"])
def test_descriptor_and_pointer_paths(aligned, mask_kind):
    # fp32 rows of 16 values (64 bytes) and a mask with 32 keys are aligned; rows of 18 values
    # (72 bytes) and a key-sliced mask view (row stride 33) are not
    head_dim, kv_len = (16, 32) if aligned else (18, 19)
    gen = torch.Generator().manual_seed(1)
    mask = torch.randn(1, 2, 13, kv_len + (0 if aligned else 14), generator=gen,
                       dtype=torch.float64)[..., :kv_len]
    mask = mask > -1.0 if mask_kind == "bool" else mask.requires_grad_()
    kernel_fn, reference_fn, inputs, names = sdpa_case(q_len=13, kv_len=kv_len, lead=(1, 2),
                                                       head_dim=head_dim, value_dim=head_dim,
                                                       mask=mask)
    cast = [t.detach().float() for t in inputs[:3]] + [mask if mask_kind == "bool" else
                                                       mask.detach().float()]
    tma, mask_tma = _chosen_paths(*cast)
    assert mask_tma == aligned
    assert tma == aligned
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)
