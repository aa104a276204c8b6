"""Shared pieces of the variant tests: random inputs and the backends that serve a call."""
from __future__ import annotations


import torch

from peer_attention import dispatch
from tests.helpers import recorded_dispatch

F64 = torch.float64


def flash_inputs(batch=2, q_len=5, kv_len=7, num_q_heads=4, num_kv_heads=2, head_dim=8,
                 value_dim=6, seed=0, dtype=F64):
    """q (B, L, Hq, E), k (B, S, H, E), v (B, S, H, Ev), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()

    return (make(batch, q_len, num_q_heads, head_dim), make(batch, kv_len, num_kv_heads, head_dim),
            make(batch, kv_len, num_kv_heads, value_dim))


def sinks_for(num_q_heads, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_q_heads, generator=gen, dtype=F64).to(dtype).requires_grad_()


def slopes_for(*shape, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=torch.float32) * 0.5


def serving_backends(call):
    """Names of the backends able to serve `call(backend)` (the one the reference is asked to
    run, spied on at dispatch): after the kernels learn a variant, their tests pick it up."""
    with recorded_dispatch("select") as problems:
        call("reference")
    assert problems, "the call never reached dispatch"
    return [name for name, backend in dispatch.BACKENDS.items()
            if not backend.not_supported_reasons(problems[0])]


def grads(outputs, inputs, seed=3):
    """Gradients of sum(outputs * fixed random weights) with respect to `inputs`."""
    outputs = list(outputs)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, weights, allow_unused=True)


def assert_close_all(got, want, atol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None and w is not None, f"{what}[{i}]: missing gradient"
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=atol,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")
