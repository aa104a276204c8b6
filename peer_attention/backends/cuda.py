"""The CUDA C++ backend: kernels compiled into `peer_attention._C` (see csrc/ and docs/cuda.md).

The extension registers its kernels for the ops `peer_attention::cuda_fwd` / `cuda_bwd`
(`TORCH_LIBRARY_IMPL(peer_attention, CUDA, m)`); their schemas, fake implementations and
autograd are defined in Python (ops.py) like every other backend's.

What the kernels serve: float16/bfloat16 on CUDA devices, any S <= 16 streams with peer table,
gate, bias, joint/peer normalisation, self-pair causal (top-left or bottom-right aligned),
kv_lengths, GQA, bool and float attn_mask (with its gradient), any lengths, head dims up to 256,
forward and backward. Not served (auto then picks another backend): dropout, float32, more than 16
streams, windows/softcap/ALiBi/sinks/varlen, devices this build has no kernel image for, and a
backward that would use float32 atomics while torch asks for deterministic algorithms.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import List, Optional

import torch

from ..problem import AttentionProblem
from .base import JOINT_WITHOUT_GATE_BIAS_GRADS, UNAVAILABLE, Backend, Capabilities

MAX_STREAMS = 16  # kMaxStreams in csrc/params.h
KERNEL_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)  # kHeadDims in csrc/launch.h
# dynamic shared memory of the head-dim-256 backward kernels (DkdvConfig<256>::smem_bytes in
# csrc/backward.cuh; cuda_compile_report prints it); sm_86, sm_89 and sm_120 allow only 99 KiB
# per block, so the backend declines that backward there (by the device's opt-in limit)
BACKWARD_256_SMEM_BYTES = 132736


def _extension_error() -> Optional[str]:
    if importlib.util.find_spec("peer_attention._C") is None:
        return ("peer_attention._C is not built (this install has no CUDA extension; reinstall "
                "with a CUDA toolkit and PEER_ATTENTION_BUILD_CUDA=1)")
    try:
        from .. import _C  # noqa: F401  (importing registers the kernels)
    except ImportError as exc:
        return (f"peer_attention._C is not built ({exc}); reinstall with a CUDA toolkit and "
                "PEER_ATTENTION_BUILD_CUDA=1")
    return None


def kernel_head_dim(problem: AttentionProblem) -> int:
    """The head dim of the kernel that serves `problem` (E and Ev padded to 8, then up)."""
    dim = max(-(-problem.head_dim // 8) * 8, -(-problem.value_dim // 8) * 8)
    return next((d for d in KERNEL_HEAD_DIMS if dim <= d), dim)


def _needs_backward(problem: AttentionProblem) -> bool:
    if not torch.is_grad_enabled():
        return False
    inputs = (problem.q, problem.k, problem.v, problem.gate, problem.bias, problem.attn_mask,
              problem.sinks)
    return any(t is not None and t.requires_grad for t in inputs)


def atomic_gradients(problem: AttentionProblem) -> List[str]:
    """The gradients the backward kernels sum with float32 atomics (an order that changes from run
    to run): dgate and dbias over query tiles, dK/dV over the query heads of a GQA group."""
    found = []
    if problem.gate is not None and problem.gate.requires_grad:
        found.append("gate")
    if problem.bias is not None and problem.bias.requires_grad:
        found.append("bias")
    if problem.num_q_heads != problem.num_kv_heads and (problem.k.requires_grad
                                                        or problem.v.requires_grad):
        found.append("GQA key/value")
    return found


@functools.lru_cache(maxsize=None)
def kernel_image_error(index: int) -> str:
    """'' when the built extension holds machine code or PTX for CUDA device `index`, else why not
    (a wheel built for "8.0;9.0a" without PTX cannot run on sm_100/sm_120)."""
    from .. import _C

    return _C.kernel_image_error(index)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int):
    """(compute capability, opt-in shared memory per block in bytes or None) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), getattr(props, "shared_memory_per_block_optin", None)


class CudaBackend(Backend):
    name = "cuda"
    python_kernels = False
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=256,
        dropout=False,
        max_streams=MAX_STREAMS,
        bottom_right=True,
    )
    # the kernels take Delta = <grad_out, out>, and recompute it from their own keys for gate/bias
    merged_statistics = JOINT_WITHOUT_GATE_BIAS_GRADS

    def unavailable_reason(self) -> Optional[str]:
        error = _extension_error()  # dispatch asks once, at import, and caches the answer
        if error:
            return error
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None

    def extra_reasons(self, problem: AttentionProblem) -> List[str]:
        reasons = []
        q = problem.q
        if q.device.type == "cuda" and UNAVAILABLE.get(self.name) is None:
            index = q.device.index if q.device.index is not None else torch.cuda.current_device()
            capability, smem = _device_limits(index)
            if capability < (8, 0):
                reasons.append(f"compute capability {capability[0]}.{capability[1]} < 8.0 "
                               "(mma.sync bf16, cp.async)")
            else:
                image_error = kernel_image_error(index)
                if image_error:
                    reasons.append(f"this build of peer_attention._C has no kernel for compute "
                                   f"capability {capability[0]}.{capability[1]} ({image_error}); "
                                   "rebuild with TORCH_CUDA_ARCH_LIST naming it")
            if (_needs_backward(problem) and kernel_head_dim(problem) == 256 and smem is not None
                    and smem < BACKWARD_256_SMEM_BYTES):
                reasons.append(f"backward for head dims above 192 needs {BACKWARD_256_SMEM_BYTES} "
                               f"bytes of shared memory per block, the device has {smem}")
        if torch.are_deterministic_algorithms_enabled() and _needs_backward(problem):
            atomics = atomic_gradients(problem)
            if atomics:
                reasons.append("torch.use_deterministic_algorithms(True): the backward sums the "
                               f"{', '.join(atomics)} gradients with float32 atomics")
        if problem.head_dim == 0:  # (zero heads, queries or keys never get here: dispatch)
            reasons.append("head dim E=0 (no kernel for it)")
        return reasons
