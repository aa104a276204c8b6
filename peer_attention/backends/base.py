"""What a backend is: its capabilities, why it cannot serve a call, and its two kernels.

A new backend plugs in by subclassing `Backend`:
  * `capabilities`: what it serves (devices, dtypes, head dims, features);
  * `unavailable_reason()`: why it cannot run on this machine at all (None when it can);
  * `extra_reasons(problem)`: anything the capability table cannot express (optional);
  * `forward(problem)` and `backward(problem, grad_out, out, lse, needs_grad)` on the normalised
    problem of `peer_attention.problem` (Python backends), or kernels registered from C++ for
    the ops `peer_attention::NAME_fwd/NAME_bwd` (set `python_kernels = False`);
  * optionally `decode(problem)` on the decode problem of `peer_attention.decode_problem`
    (flash_attn_with_kvcache), with `decode_reasons(problem)` saying why it cannot serve one;
  * its policies, where the defaults do not fit: `prepare(problem)` (the problem as this
    backend's forward wants it, e.g. the torch backend's RNG replay), `dropout_keep_mask(problem)`
    (its forward's keep mask regenerated in PyTorch, for double backward through dropout) and
    `merged_statistics` (where its backward takes the merged (out, lse) of context parallelism),
    `op_outputs(out, lse)` (the forward's outputs as the registered op returns them: contiguous).
It then takes its place in the order of backends/registry.py. Dispatch, validation, layouts and
autograd are done for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional

import torch
from torch import Tensor

from ..decode_problem import DecodeProblem
from ..problem import AttentionProblem

# name -> unavailable_reason(), filled once by dispatch at import (torch.compile reads a dict
# without tracing the imports and device queries behind it)
UNAVAILABLE: dict = {}
# name -> backend, filled by backends/registry.py: modules below the registry (double_backward.py,
# which ops.py imports before any backend exists) look a backend's policies up by its op's name
BACKENDS: Dict[str, "Backend"] = {}

# Backend.merged_statistics: where its backward takes merged (out, lse) (see
# distributed/lowlevel.py): any problem, "joint" mode, or "joint" mode without gate/bias gradients
# (elsewhere it recomputes Delta or U_p from its own keys); None = not declared (not tested)
ANY, JOINT_ONLY, JOINT_WITHOUT_GATE_BIAS_GRADS = "any", "joint", "joint without gate/bias grads"

ALL_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Capabilities:
    devices: FrozenSet[str]                      # torch device types, e.g. {"cuda"}
    dtypes: FrozenSet[torch.dtype]
    max_head_dim: Optional[int] = None           # E and Ev; None = unbounded
    bool_mask: bool = True
    float_mask: bool = True
    float_mask_grad: bool = True                 # gradient for a float attn_mask
    dropout: bool = True
    gqa: bool = True
    causal: bool = True
    gate: bool = True
    bias: bool = True
    kv_lengths: bool = True
    max_streams: Optional[int] = None            # None = any S
    normalize: FrozenSet[str] = field(default_factory=lambda: frozenset({"joint", "peer"}))
    # SPEC section 9 variants: self-pair window, bottom-right alignment, softcap, ALiBi, sinks,
    # and the diagonal (varlen) peer table
    window: bool = False
    bottom_right: bool = False
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False
    diagonal_peers: bool = False
    # devices where auto may pick it (None = all of `devices`); an explicit request may use any
    auto_devices: Optional[FrozenSet[str]] = None


def _variant_reasons(caps: Capabilities, problem: AttentionProblem) -> List[str]:
    wanted = (
        ("sliding window", problem.has_window, caps.window),
        ("bottom-right aligned causal/window", problem.bottom_right, caps.bottom_right),
        ("softcap", problem.softcap > 0, caps.softcap),
        ("ALiBi", problem.alibi_slopes is not None, caps.alibi),
        ("attention sinks", problem.sinks is not None, caps.sinks),
        ("varlen (diagonal peer table)", problem.diagonal_peers and problem.num_streams > 1,
         caps.diagonal_peers),
    )
    return [f"{what} not supported" for what, asked, served in wanted if asked and not served]


class Backend:
    name: str = ""
    capabilities: Capabilities
    python_kernels: bool = True
    merged_statistics: Optional[str] = None  # ANY, JOINT_ONLY, JOINT_WITHOUT_GATE_BIAS_GRADS

    def prepare(self, problem: AttentionProblem) -> AttentionProblem:
        """The problem as this backend's forward wants it, once dispatch has chosen it (the API's
        problem serves every backend; the default changes nothing)."""
        return problem

    def dropout_keep_mask(self, problem: AttentionProblem) -> Optional[Tensor]:
        """(B, Hq, Tq, Tk) bool: the keep mask this backend's forward applied to `problem`
        (dropout_p > 0), regenerated in PyTorch for a differentiable recomputation (double
        backward); None when it cannot be regenerated (double backward through dropout then
        raises rather than give a wrong gradient)."""
        return None

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all; computed once, at import."""
        return None

    def extra_reasons(self, problem: AttentionProblem) -> List[str]:
        return []

    def not_supported_reasons(self, problem: AttentionProblem) -> List[str]:
        """Every reason this backend cannot serve `problem` (empty when it can)."""
        reasons = self._basic_reasons(problem)
        caps = self.capabilities
        q = problem.q
        mask = problem.attn_mask
        if mask is not None:
            if mask.dtype == torch.bool and not caps.bool_mask:
                reasons.append("bool attn_mask not supported")
            if mask.dtype != torch.bool:
                if not caps.float_mask:
                    reasons.append("float attn_mask not supported")
                elif mask.requires_grad and not caps.float_mask_grad:
                    reasons.append("gradient of a float attn_mask not supported")
        if problem.dropout_p > 0 and not caps.dropout:
            reasons.append("dropout not supported")
        if q.shape[1] != problem.k.shape[1] and not caps.gqa:
            reasons.append("GQA (Hq != H) not supported")
        if problem.is_causal and not caps.causal:
            reasons.append("is_causal not supported")
        if problem.gate is not None and not caps.gate:
            reasons.append("gate not supported")
        if problem.bias is not None and not caps.bias:
            reasons.append("bias not supported")
        if problem.kv_lengths is not None and not caps.kv_lengths:
            reasons.append("kv_lengths not supported")
        if caps.max_streams is not None and problem.num_streams > caps.max_streams:
            reasons.append(f"{problem.num_streams} streams > {caps.max_streams}")
        if problem.normalize not in caps.normalize:
            reasons.append(f"normalize={problem.normalize!r} not supported")
        if problem.has_variants or not problem.peers:  # not peers: the diagonal (varlen) table
            reasons.extend(_variant_reasons(caps, problem))
        extra = self.extra_reasons(problem)
        return reasons + extra if extra else reasons

    def decode_reasons(self, problem: DecodeProblem) -> List[str]:
        """Every reason this backend cannot serve a decode (KV-cache) problem; a backend that
        serves them overrides this with common_decode_reasons(problem) + its own."""
        return ["decode over a KV cache (flash_attn_with_kvcache) is not implemented by this "
                "backend"]

    def common_decode_reasons(self, problem: DecodeProblem) -> List[str]:
        """The capability table's answer for a decode problem: availability, device, dtype,
        head dims."""
        return self._basic_reasons(problem)

    def _basic_reasons(self, problem) -> List[str]:
        """Availability, device, dtype and head dims: what every kind of problem is asked first
        (an attention or a decode problem: both have q, head_dim and value_dim)."""
        why = UNAVAILABLE.get(self.name)
        reasons = [why] if why else []
        caps, q = self.capabilities, problem.q
        if q.device.type not in caps.devices:
            reasons.append(f"device {q.device.type!r} not in {sorted(caps.devices)}")
        if q.dtype not in caps.dtypes:
            reasons.append(f"dtype {q.dtype} not in {sorted(str(d) for d in caps.dtypes)}")
        if caps.max_head_dim is not None:
            for label, dim in (("E", problem.head_dim), ("Ev", problem.value_dim)):
                if dim > caps.max_head_dim:
                    reasons.append(f"head dim {label}={dim} > {caps.max_head_dim}")
        return reasons

    def decode(self, problem: DecodeProblem):
        raise NotImplementedError(self.decode_reasons(problem)[0])

    def forward(self, problem: AttentionProblem):
        raise NotImplementedError

    def backward(self, problem: AttentionProblem, grad_out, out, lse, needs_grad):
        """(dq, dk, dv, dgate, dbias, dmask, dsinks) (problem.py's note): dmask at any shape that
        sums to problem.mask_grad_shape(attn_mask), e.g. accumulated at a broadcast mask's own
        shape; the ops layer brings it to the shape the op and autograd want."""
        raise NotImplementedError

    def op_outputs(self, out: Tensor, lse: Tensor):
        """(out, lse) of `forward` as the registered op returns them: contiguous (its fake kernel
        says so). The eager path keeps the layouts `forward` returned."""
        return out.contiguous(), lse.contiguous()
