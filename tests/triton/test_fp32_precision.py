"""The evidence behind utils.f32_precision (the input precision of the fp32 products of each
kernel: "tf32x3", and "ieee" for dK/dV above padded head dim 128). The
interpreter computes dots in numpy fp32 whatever the precision, so this emulates the products as
the GPU computes them (Triton's 3xTF32: each fp32 operand split into a TF32 high part, rounded
to nearest, and a TF32 remainder; hi*hi + hi*lo + lo*hi accumulated in fp32) in the attention
forward and backward the kernels compute (scores, P V, dO V^T, dS K, dS^T Q, P^T dO, and the
gate gradient's sum over rows of dO * U) and measures them against float64: within SPEC section
8's 1e-4 with margin, within 2x of IEEE fp32's own error, while plain TF32 is 100x off. That the
kernels really compile their fp32 dots with the precision f32_precision gives is checked on the
compiled TTIR (test_compiled_ir.py)."""
import pytest
import torch

from peer_attention.triton_kernels.utils import TF32X3_DKDV_MAX_DIM, f32_precision, padded_dim

FP32_BOUND = 1e-4  # SPEC section 8, float32 vs the float64 reference


def _tf32(x):
    """Round fp32 to TF32 (10 mantissa bits), to nearest with ties away (cvt.rna.tf32.f32)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32x3(a, b):
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi


MATMULS = {"ieee": torch.matmul, "tf32x3": _tf32x3, "tf32": lambda a, b: _tf32(a) @ _tf32(b)}


def _attention(q, k, v, do, mm):
    """The products of the kernels (one head, one stream), each through `mm`."""
    scale = q.shape[-1] ** -0.5
    probs = torch.softmax(mm(q, k.T) * scale, -1)
    out = mm(probs, v)
    ds = probs * (mm(do, v.T) - (do * out).sum(-1, keepdim=True))
    return dict(out=out, dq=mm(ds, k) * scale, dk=mm(ds.T, q) * scale, dv=mm(probs.T, do),
                dgate=(do * out).sum(0))


def _errors(length, dim, precision):
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(length, dim, generator=gen, dtype=torch.float64)
                   for _ in range(4))
    ref = _attention(q, k, v, do, torch.matmul)
    got = _attention(q.float(), k.float(), v.float(), do.float(), MATMULS[precision])
    return {name: (got[name].double() - ref[name]).abs().max().item() for name in ref}


@pytest.mark.parametrize("length,dim", [(1024, 256), (2048, 64)])
def test_3xtf32_meets_the_fp32_bound(length, dim):
    ieee = _errors(length, dim, "ieee")
    x3 = _errors(length, dim, "tf32x3")
    tf32 = _errors(length, dim, "tf32")
    for name in x3:
        assert x3[name] < FP32_BOUND / 10, (name, x3[name])
        assert x3[name] < 2 * ieee[name] + 1e-7, (name, x3[name], ieee[name])
        assert tf32[name] > FP32_BOUND, (name, tf32[name])  # why never plain TF32


# what each kernel computes with its products (the decode kernel: the forward's out)
KERNEL_OUTPUTS = {"fwd": ("out",), "decode": ("out",), "bwd_preprocess": ("dgate",),
                  "bwd_dq": ("dq",), "bwd_dkdv": ("dk", "dv")}


@pytest.mark.parametrize("kernel", sorted(KERNEL_OUTPUTS))
@pytest.mark.parametrize("dim", [40, 128, 200, 256])
def test_each_kernels_precision_meets_the_fp32_bound(kernel, dim):
    """Per kernel and head dim: the precision f32_precision gives (the F32_DOT flag every fp32
    launch of the forward, backward and decode kernels takes) computes that kernel's results
    within SPEC section 8's fp32 bound, with margin (the products emulated as the GPU
    computes them; IEEE is torch's fp32 matmul)."""
    name = kernel.replace("bwd_", "")
    precision = f32_precision(torch.float32, padded_dim(dim), padded_dim(dim), name)
    ieee = name == "dkdv" and padded_dim(dim) > TF32X3_DKDV_MAX_DIM
    assert precision == ("ieee" if ieee else "tf32x3")
    # 16-bit inputs: plain tensor-core products (the interpreter, where this runs: fp32 ones)
    assert f32_precision(torch.bfloat16, padded_dim(dim), padded_dim(dim), name) in ("",
                                                                                  precision)
    errors = _errors(1024, dim, precision)
    for name in KERNEL_OUTPUTS[kernel]:
        assert errors[name] < FP32_BOUND / 10, (kernel, dim, precision, name, errors[name])
