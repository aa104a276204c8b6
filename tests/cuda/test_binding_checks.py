"""The argument checks of csrc/binding.cpp on a direct torch.ops.peer_attention.cuda_fwd/cuda_bwd
call (SPEC section 4: a clear error naming the argument, never a crash). The extension registers
the same checks for CPU tensors (then refuses: the kernels need CUDA), so they run here without
a GPU; a check of another device sends a meta tensor straight to that CPU kernel (redispatch),
as a CPU gate with CUDA q reaches the CUDA kernel's identical check."""
import importlib.util

import pytest
import torch

from peer_attention import ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peer_attention._C") is None,
                                reason="peer_attention._C was not built")

B, HQ, H, T, E = 2, 4, 2, 5, 16
CPU_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@pytest.fixture(scope="module")
def cuda_ops():
    from peer_attention import _C  # noqa: F401  (registers the kernels)

    return ops.define_backend_ops("cuda")


def _problem(**changes):
    """The 21 problem arguments of a valid 2-stream call (lengths 2 + 3), with `changes`."""
    args = dict(
        q=torch.randn(B, HQ, T, E, dtype=torch.float16),
        k=torch.randn(B, H, T, E, dtype=torch.float16),
        v=torch.randn(B, H, T, E, dtype=torch.float16),
        q_lens=[2, 3], kv_lens=[2, 3], peers=[1, 1, 1, 1],
        gate=torch.ones(B, 2, 2, HQ, E), bias=torch.zeros(B, 2, 2, HQ),
        kv_lengths=torch.full((B, 2), 2, dtype=torch.int32),
        attn_mask=torch.ones(B, HQ, T, T, dtype=torch.bool), dropout_seed=None,
        dropout_p=0.0, is_causal=False, scale=0.25, normalize="joint",
        window_left=-1, window_right=-1, bottom_right=True, softcap=0.0,
        alibi_slopes=None, sinks=None)
    args.update(changes)
    return list(args.values())


def _backward(problem, **changes):
    q, v = problem[0], problem[2]
    grads = dict(grad_out=torch.randn(B, HQ, T, v.shape[-1], dtype=torch.float16),
                 out=torch.randn(B, HQ, T, v.shape[-1], dtype=torch.float16),
                 lse=torch.zeros(B, HQ, q.shape[2]))
    grads.update(changes)
    return list(grads.values()) + problem + [[True] * 7]


def test_a_valid_call_passes_every_check_then_asks_for_cuda(cuda_ops):
    fwd, bwd = cuda_ops
    with pytest.raises(NotImplementedError, match="must be CUDA tensors, got cpu"):
        fwd(*_problem())
    with pytest.raises(NotImplementedError, match="must be CUDA tensors, got cpu"):
        bwd(*_backward(_problem()))
    peer = _problem(normalize="peer")
    with pytest.raises(NotImplementedError, match="must be CUDA tensors"):
        bwd(*_backward(peer, lse=torch.zeros(B, HQ, 2, T)))


def test_zero_key_value_heads_is_an_error_not_a_crash(cuda_ops):
    fwd, bwd = cuda_ops
    empty = torch.empty(B, 0, T, E, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="k and v must have at least one head, got 0"):
        fwd(*_problem(k=empty, v=empty))
    with pytest.raises(RuntimeError, match="at least one head"):
        bwd(*_backward(_problem(k=empty, v=empty)))


BAD_SHAPES = {
    "q": dict(q=torch.randn(HQ, T, E, dtype=torch.float16)),
    "k": dict(k=torch.randn(B, H, T, E + 8, dtype=torch.float16)),
    "k batch": dict(k=torch.randn(B + 1, H, T, E, dtype=torch.float16)),
    "v heads": dict(v=torch.randn(B, H + 1, T, E, dtype=torch.float16)),
    "v length": dict(v=torch.randn(B, H, T + 1, E, dtype=torch.float16)),
    "q heads": dict(q=torch.randn(B, 3, T, E, dtype=torch.float16)),
    "gate": dict(gate=torch.ones(1, 2, 2, HQ, E)),  # broadcast shapes arrive expanded
    "bias": dict(bias=torch.zeros(B, 2, 2)),
    "kv_lengths": dict(kv_lengths=torch.full((B,), 2, dtype=torch.int32)),
    "attn_mask": dict(attn_mask=torch.ones(B, HQ, T, T - 1, dtype=torch.bool)),
    "q_lens": dict(q_lens=[2, 2]),
    "peers": dict(peers=[1, 1, 1]),
    "head dim": dict(q=torch.randn(B, HQ, T, 264, dtype=torch.float16),
                     k=torch.randn(B, H, T, 264, dtype=torch.float16)),
}
MESSAGES = {"q": "q must be 4-d", "k": "q and k head dims differ", "k batch": "batch size",
            "v heads": "head counts differ", "v length": "lengths differ",
            "q heads": "must be a multiple of k/v heads", "gate": "gate: expected shape",
            "bias": "bias: expected shape", "kv_lengths": "kv_lengths: expected shape",
            "attn_mask": "attn_mask: expected shape", "q_lens": "stream lengths add up to 4",
            "peers": "do not describe 2 streams", "head dim": "head dims up to 256"}


@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
def test_wrong_shapes_are_named(cuda_ops, case):
    fwd, bwd = cuda_ops
    with pytest.raises(RuntimeError, match=MESSAGES[case]):
        fwd(*_problem(**BAD_SHAPES[case]))
    with pytest.raises(RuntimeError, match=MESSAGES[case]):
        bwd(*_backward(_problem(**BAD_SHAPES[case])))


def test_wrong_dtypes_are_named(cuda_ops):
    fwd, _ = cuda_ops
    with pytest.raises(RuntimeError, match="float16 or bfloat16, got Float"):
        fwd(*_problem(q=torch.randn(B, HQ, T, E)))
    with pytest.raises(RuntimeError, match="must share a dtype"):
        fwd(*_problem(v=torch.randn(B, H, T, E, dtype=torch.bfloat16)))
    with pytest.raises(RuntimeError, match="kv_lengths must be an integer tensor"):
        fwd(*_problem(kv_lengths=torch.full((B, 2), 2.0)))
    with pytest.raises(RuntimeError, match="gate must be floating point"):
        fwd(*_problem(gate=torch.ones(B, 2, 2, HQ, E, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="attn_mask must be bool or floating point"):
        fwd(*_problem(attn_mask=torch.ones(B, HQ, T, T, dtype=torch.int64)))


@pytest.mark.parametrize("case", ["grad_out", "out", "lse"])
def test_wrong_backward_inputs_are_named(cuda_ops, case):
    _, bwd = cuda_ops
    bad = {"grad_out": torch.randn(B, HQ, T, E + 1, dtype=torch.float16),
           "out": torch.randn(B, HQ, T - 1, E, dtype=torch.float16),
           "lse": torch.zeros(B, HQ, 2, T)}[case]  # a peer-mode lse for a joint call
    with pytest.raises(RuntimeError, match=f"{case}: expected shape"):
        bwd(*_backward(_problem(), **{case: bad}))


@pytest.mark.parametrize("name", ["k", "v", "gate", "bias", "attn_mask", "kv_lengths"])
def test_inputs_on_another_device_are_refused(cuda_ops, name):
    """A tensor on another device than q (here meta against cpu) never reaches the kernels: the
    case of a CPU gate with CUDA q, whose pointer the kernel would dereference."""
    fwd, bwd = cuda_ops
    problem = _problem()
    position = ["q", "k", "v", "q_lens", "kv_lens", "peers", "gate", "bias", "kv_lengths",
                "attn_mask"].index(name)
    problem[position] = problem[position].to("meta")
    with pytest.raises(RuntimeError, match=f"{name}: expected device cpu .as q.*, got meta"):
        fwd.redispatch(CPU_ONLY, *problem)
    with pytest.raises(RuntimeError, match=f"{name}: expected device cpu"):
        bwd.redispatch(CPU_ONLY, *_backward(problem))


@pytest.mark.parametrize("name", ["grad_out", "out", "lse"])
def test_backward_inputs_on_another_device_are_refused(cuda_ops, name):
    _, bwd = cuda_ops
    args = _backward(_problem())
    position = ["grad_out", "out", "lse"].index(name)
    args[position] = args[position].to("meta")
    with pytest.raises(RuntimeError, match=f"{name}: expected device cpu .as q., got meta"):
        bwd.redispatch(CPU_ONLY, *args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_gate_with_cuda_q_is_refused_by_the_cuda_kernel(cuda_ops):
    fwd, _ = cuda_ops
    problem = _problem()
    for i in (0, 1, 2, 7, 8, 9):  # q k v, bias, kv_lengths, mask on the GPU; the gate stays
        problem[i] = problem[i].cuda()
    with pytest.raises(RuntimeError, match="gate: expected device cuda:0 .as q., got cpu"):
        fwd(*problem)
