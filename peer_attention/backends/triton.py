"""The Triton backend: the fused kernels of `peer_attention.triton_kernels`.

On CUDA tensors it compiles the kernels; on CPU tensors it runs them only under the Triton
interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..decode_problem import DecodeProblem, decode_outputs, from_attention
from ..problem import AttentionProblem
from .base import JOINT_WITHOUT_GATE_BIAS_GRADS, Backend, Capabilities

_INTERPRET = False  # TRITON_INTERPRET as the kernels read it, once they are imported


def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    try:  # e.g. a triton too old for the kernels
        from ..triton_kernels import utils
    except ImportError as exc:
        return f"the Triton kernels cannot be imported ({exc})"
    global _INTERPRET
    _INTERPRET = utils.INTERPRET
    return None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 was set before triton was imported (triton_kernels.utils.INTERPRET);
    False where the kernels cannot be imported."""
    return _INTERPRET


MAX_GRID_Y = 65535


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cuda", "cpu"}),
        # the interpreter is for testing kernels, far slower than the reference: never auto on CPU
        auto_devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        window=True, bottom_right=True, softcap=True, alibi=True, sinks=True,
        diagonal_peers=True,
    )
    # the kernels take Delta = <grad_out, out>, and recompute it from their own keys for gate/bias
    merged_statistics = JOINT_WITHOUT_GATE_BIAS_GRADS

    def dropout_keep_mask(self, problem: AttentionProblem) -> Optional[Tensor]:
        from ..triton_kernels import dropout_keep_mask

        return dropout_keep_mask(problem)

    def unavailable_reason(self) -> Optional[str]:
        error = _import_error()
        if error:
            return error
        if not torch.cuda.is_available() and not interpreter_enabled():
            return "no CUDA device is visible and TRITON_INTERPRET=1 is not set"
        return None

    def extra_reasons(self, problem: AttentionProblem) -> List[str]:
        if problem.q.device.type == "cpu" and not interpreter_enabled():
            return ["CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"]
        # the kernels put batch x heads on grid axis 1, which CUDA caps at 65535 programs
        rows = problem.q.shape[0] * problem.num_q_heads
        if rows > MAX_GRID_Y:
            return [f"batch x query heads = {rows} > {MAX_GRID_Y} (the kernels' grid axis 1)"]
        if problem.q.device.type != "cpu":  # below sm_80, or no config fits the device
            from ..triton_kernels.configs import decline_reason

            reason = decline_reason(problem, problem.q.device.index or 0)
            if reason:
                return [reason]
        return []

    def decode_reasons(self, problem: DecodeProblem) -> List[str]:
        reasons = self.common_decode_reasons(problem)
        if problem.q.device.type == "cpu" and not interpreter_enabled():
            reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
        rows = problem.q.shape[0] * problem.num_kv_heads
        if rows > MAX_GRID_Y:
            reasons.append(f"batch x key/value heads = {rows} > {MAX_GRID_Y} (the decode "
                           "kernel's grid axis 1)")
        return reasons

    def decode(self, problem: DecodeProblem):
        from ..triton_kernels.decode import decode_attention

        return decode_attention(problem)

    def forward(self, problem: AttentionProblem):
        from ..triton_kernels import decode, forward

        # decode shapes (a few queries over many keys): the split-KV kernels, same numbers
        route = from_attention(problem, decode.MAX_QUERY_ROWS, decode.MIN_DECODE_KEYS)
        if route is not None and route.q.shape[0] * route.num_kv_heads <= MAX_GRID_Y:
            q = problem.q
            out = torch.empty(q.shape[0], q.shape[1], q.shape[2], problem.value_dim,
                              dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
            decode.decode_attention(route, *decode_outputs(route, out, lse))
            return out, lse
        return forward(problem)

    def backward(self, problem: AttentionProblem, grad_out, out, lse, needs_grad):
        from ..triton_kernels import backward

        return backward(problem, grad_out, out, lse, needs_grad)
