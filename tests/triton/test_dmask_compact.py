"""A float attn_mask's gradient at the mask's own shape (issue 23): a mask broadcast over batch,
heads or queries gets its gradient accumulated at its un-broadcast shape (problem.mask_grad_shape),
not in a dense (B, Hq, Tq, Tk) buffer, by the Triton kernels (atomic adds into a compact float32
buffer; dense then summed under deterministic algorithms) and the torch/reference backends, and
the gradient reaching the user's mask matches the float64 reference (SPEC section 8)."""
import pytest
import torch

from peer_attention import entry, ops
from peer_attention.api import peer_problem
from peer_attention.problem import mask_grad_shape
from peer_attention.triton_kernels import bwd
from tests.dmask_cases import (B, DEVICE, HQ, KV_LENGTHS, MASK_SHAPES, TK, TQ, attention,
                               deterministic, inputs, shape_id)
from tests.helpers import assert_matches_reference

BACKENDS = ["triton", "torch", "reference"]


# deterministic algorithms change the Triton kernels' path only (dense buffer, summed afterwards)
RUNS = [("triton", False), ("triton", True), ("torch", False), ("reference", False)]


@pytest.mark.parametrize("backend,determinism", RUNS,
                         ids=["triton-atomic", "triton-deterministic", "torch", "reference"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=shape_id)
def test_broadcast_mask_gradient_matches_reference(backend, shape, determinism):
    with deterministic(determinism):
        for causal in (False, True):
            assert_matches_reference(attention(backend, causal, KV_LENGTHS),
                                     attention("reference", causal, KV_LENGTHS), inputs(shape),
                                     torch.float32, names=["q", "k", "v", "mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_returns_the_compact_gradient(backend):
    """The registered backward op (what torch.compile and the compiled extension see) returns
    dmask at mask_grad_shape, as its fake kernel declares, for a dense and a broadcast mask."""
    for shape in [(1, 1, TQ, TK), (B, 1, 1, TK), (B, HQ, TQ, TK)]:
        q, k, v, mask = (t.detach().float() for t in inputs(shape))
        problem = peer_problem([q], [k], [v], enable_gqa=True)._replace(
            attn_mask=mask.expand(B, HQ, TQ, TK))
        name = entry.select_backend(problem, backend)
        out, lse = ops.backend_ops(name)[0](*problem)
        grads = entry.backward(problem, name, torch.randn_like(out), out, lse, [False] * 5 + [True, False])
        dmask = grads[5]
        assert tuple(dmask.shape) == mask_grad_shape(problem.attn_mask) == (4 - len(shape)) * (
            1,) + shape
        fake = ops._fake_bwd(out, out, lse, *problem, [False] * 5 + [True, False])[5]
        assert fake.shape == dmask.shape


def _allocations(monkeypatch):
    """The dmask buffers the Triton backward allocates (spied on at bwd._dmask_buffer)."""
    made = []
    real = bwd._dmask_buffer

    def spy(mask, device):
        made.append(real(mask, device))
        return made[-1]
    monkeypatch.setattr(bwd, "_dmask_buffer", spy)
    return made


@pytest.mark.parametrize("shape", [(TQ, TK), (B, 1, TQ, TK), (1, HQ, 1, TK), (B, HQ, TQ, TK)],
                         ids=shape_id)
def test_triton_allocates_the_mask_gradient_at_its_own_shape(shape, monkeypatch):
    made = _allocations(monkeypatch)
    q, k, v, mask = inputs(shape)
    q, k, v, mask = (t.detach().float().requires_grad_() for t in (q, k, v, mask))
    attention("triton")(q, k, v, mask).sum().backward()
    full = (4 - len(shape)) * (1,) + shape
    assert [tuple(m.shape) for m in made] == [full]
    dense = full == (B, HQ, TQ, TK)
    assert made[0].dtype == torch.float32 and (dense or made[0].numel() < B * HQ * TQ * TK)
    assert mask.grad.shape == mask.shape
    # deterministic algorithms: a dense buffer, summed by torch afterwards
    made.clear()
    mask.grad = None
    with deterministic(True):
        attention("triton")(q, k, v, mask).sum().backward()
    assert [tuple(m.shape) for m in made] == [(B, HQ, TQ, TK)]


def test_a_broadcast_leaf_mask_gets_its_full_gradient():
    """An expand()ed mask that is itself a leaf requiring grad (or retains its grad) needs every
    element of its gradient: it is copied dense first, its gradient is per element."""
    base = torch.randn(1, 1, TQ, TK, dtype=torch.float64, device=DEVICE)
    q, k, v, _ = (t.detach() for t in inputs((1, 1, TQ, TK)))
    grads = {}
    for backend in ("triton", "reference"):
        dtype = torch.float32 if backend == "triton" else torch.float64
        mask = base.to(dtype).expand(B, HQ, TQ, TK).detach().requires_grad_()
        assert mask.is_leaf and mask.stride()[:2] == (0, 0)
        attention(backend)(q.to(dtype), k.to(dtype), v.to(dtype), mask).square().sum() \
            .backward()
        grads[backend] = mask.grad.double()
    assert (grads["triton"] - grads["reference"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_returns_dmask_at_dmask_shape(backend):
    """The dmask_shape argument (the autograd formula's, from the strides it traced) decides the
    op's dmask shape whatever strides the mask has when the op runs (inductor may materialise
    it): a dense mask's gradient summed down, a broadcast one's shared out; the same sum."""
    q, k, v, base = (t.detach().float() for t in inputs((1, 1, TQ, TK)))
    needs = [False] * 5 + [True, False]
    compact, full = [1, 1, TQ, TK], [B, HQ, TQ, TK]
    sums = []
    for mask, dmask_shape in [(base.expand(full), compact), (base.expand(full).contiguous(), compact),
                              (base.expand(full), full), (base.expand(full).contiguous(), full)]:
        problem = peer_problem([q], [k], [v], enable_gqa=True)._replace(attn_mask=mask)
        name = entry.select_backend(problem, backend)
        fwd_op, bwd_op = ops.backend_ops(name)
        out, lse = fwd_op(*problem)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        dmask = bwd_op(grad_out, out, lse, *problem, needs, dmask_shape)[5]
        assert list(dmask.shape) == dmask_shape and dmask.is_contiguous()
        sums.append(dmask.sum_to_size(compact))
    for s in sums[1:]:
        torch.testing.assert_close(s, sums[0], atol=1e-5, rtol=1e-5)


def test_a_broadcast_mask_that_retains_its_grad_gets_it_in_full():
    q, k, v, base = (t.detach().float() for t in inputs((1, 1, TQ, TK)))
    base.requires_grad_()
    grads = []
    for backend in ("triton", "torch"):
        mask = base.expand(B, HQ, TQ, TK)
        mask.retain_grad()
        problem = peer_problem([q], [k], [v], enable_gqa=True)._replace(attn_mask=mask)
        entry.run(problem, backend)[0].square().sum().backward()
        grads.append(mask.grad)
    dense = base.detach().expand(B, HQ, TQ, TK).contiguous().requires_grad_()
    problem = peer_problem([q], [k], [v], enable_gqa=True)._replace(attn_mask=dense)
    entry.run(problem, "reference")[0].square().sum().backward()
    for got in grads:
        torch.testing.assert_close(got, dense.grad, atol=1e-4, rtol=0)
