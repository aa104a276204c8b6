"""64-bit row offsets. Rows x row stride passes 2^31 elements in flash-attn layouts (L*H*E: H=32,
E=128 at 524,288 tokens) and in materialised masks (Tq*Tk, about 46k tokens); 32-bit offsets wrap
there (the interpreter wraps them in int32 like a GPU). At a small shape: q, k, v, dO and the mask
are views into one large, mostly untouched allocation (virtual memory: only the rows used are
written) with a row stride of 2^27 elements, so rows from 16 on lie past 2^31 elements; the
kernels must give bit for bit what they give on contiguous copies. The compile check (below)
shows the offset arithmetic is 64-bit in the compiled code."""
import pytest
import torch

from peer_attention.problem import AttentionProblem
from peer_attention.triton_kernels import backward, forward
from peer_attention.triton_kernels.utils import INTERPRET

ROW = 2 ** 27  # elements (fp16) between consecutive rows of every view: row 16 is at 2^31
Q_LENS, KV_LENS, E = (12, 9), (16, 4), 16  # the second streams' rows cross 2^31 (16: the
# mask descriptor's key offset stays 16-byte aligned, as the interpreter asserts)


def _far_views(aligned):
    """q, k, v, dO (fp16, [1, 1, rows, E]) and a float mask ([1, 1, Tq, Tk]) sharing one
    allocation of 20 rows x 2^27 elements (5 GiB of address space, a few pages written).
    aligned=False shifts every view by one element: no tensor descriptors (pointer loads)."""
    rows = max(sum(Q_LENS), sum(KV_LENS))
    storage = torch.empty(rows * ROW + 8 * E, dtype=torch.float16)
    shift = 0 if aligned else 1
    gen = torch.Generator().manual_seed(0)
    views = []
    for i, (n, width) in enumerate([(sum(Q_LENS), E), (sum(KV_LENS), E), (sum(KV_LENS), E),
                                    (sum(Q_LENS), E), (sum(Q_LENS), sum(KV_LENS))]):
        view = storage.as_strided((1, 1, n, width), (ROW * rows, ROW * rows, ROW, 1),
                                  storage_offset=shift + i * 2 * E)
        view.copy_(torch.randn(view.shape, generator=gen).to(torch.float16))
        views.append(view)
    return views


def _problem(q, k, v, mask):
    n = len(Q_LENS)
    gen = torch.Generator().manual_seed(1)
    gate = (torch.rand(1, n, n, 1, E, generator=gen) + 0.5).to(torch.float16)
    bias = torch.randn(1, n, n, 1, generator=gen).to(torch.float16)
    return AttentionProblem(q, k, v, Q_LENS, KV_LENS, (1, 1, 1, 1), gate, bias, None, mask,
                            None, 0.0, False, E ** -0.5, "joint")


def _run(problem, grad_out):
    out, lse = forward(problem)
    grads = backward(problem, grad_out, out, lse, (True,) * 6 + (False,))
    return (out, lse) + tuple(grads[:6])


@pytest.mark.skipif(not INTERPRET, reason="the interpreter wraps int32 offsets like a GPU; on a "
                    "GPU the same test would need 5 GiB")
@pytest.mark.parametrize("aligned", [True, False], ids=["descriptors", "pointers"])
def test_rows_past_2_31_elements(aligned):
    q, k, v, grad_out, mask = _far_views(aligned)
    assert q.stride(2) * (q.shape[2] - 1) >= 2 ** 31 and mask.stride(2) * 16 >= 2 ** 31
    far = _run(_problem(q, k, v, mask), grad_out)
    near = _run(_problem(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous()),
                grad_out.contiguous())
    names = ("out", "lse", "dq", "dk", "dv", "dgate", "dbias", "dmask")
    for name, a, b in zip(names, far, near):
        assert torch.isfinite(b).all(), name
        assert torch.equal(a, b), f"{name}: max diff {(a.float() - b.float()).abs().max()}"
