"""Backend choice and the call of a backend's registered op.

Precedence of the request: the `backend=` keyword, then the innermost `use_backend(...)` block,
then the PEER_ATTENTION_BACKEND environment variable, else auto. Auto takes the first backend of
auto_order(device) (AUTO_ORDER's entry for the device kind, else SPEED_ORDER) that can serve the
problem; the reference serves everything, so auto never fails where the reference works. An
explicit backend that cannot serve raises NotImplementedError listing its reasons.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Tuple

import torch

from . import ops
from .backends import torch_streams
from .backends.base import UNAVAILABLE, Backend
from .backends.registry import BACKENDS, ORACLE, SPEED_ORDER
from .backends.torch_dropout import STATE_ATTR
from .problem import AttentionProblem, with_dense_grad_mask

ENV_VAR = "PEER_ATTENTION_BACKEND"
AUTO = "auto"

# BACKENDS (name -> backend) and SPEED_ORDER (auto's default order): backends/registry.py
# auto's order per device kind ("cpu", or "sm90" for a GPU of compute capability 9.0), set from
# the GPU check's measurements (`scripts/gpu_check_report.py order`, bench/README.md); a kind
# without an entry uses SPEED_ORDER. Each entry ends with "reference", which serves everything.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {}
_device_kinds: Dict[torch.device, str] = {}


def device_kind(device: torch.device) -> str:
    kind = _device_kinds.get(device)
    if kind is None:
        kind = device.type
        if device.type == "cuda":  # get_device_properties: torch.compile constant-folds it
            props = torch.cuda.get_device_properties(device)
            kind = f"sm{props.major}{props.minor}"
        _device_kinds[device] = kind
    return kind


def auto_order(device: torch.device) -> Tuple[str, ...]:
    """The backends auto tries for tensors on `device`, fastest first."""
    return AUTO_ORDER.get(device_kind(device), SPEED_ORDER)


_ops: Dict[str, tuple] = {}
for _backend in BACKENDS.values():
    _ops[_backend.name] = ops.define_backend_ops(_backend.name)
    if _backend.python_kernels:
        ops.register_python_kernels(_backend.name, _backend.forward, _backend.backward,
                                    op_outputs=_backend.op_outputs)
    # after the op definitions: the cuda check imports _C, which registers its kernels for them
    UNAVAILABLE[_backend.name] = _backend.unavailable_reason()

_requested_stack: list = []  # innermost use_backend() last; a plain list so torch.compile can read it


def _check_name(name, source: str) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a backend name (str) or None, got {type(name).__name__}")
    if name == AUTO:
        return None
    if name not in BACKENDS:
        choices = ", ".join(repr(n) for n in (AUTO,) + SPEED_ORDER)
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {choices}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Run the block with `name` as the default backend ("auto" or None restores auto)."""
    _requested_stack.append(_check_name(name, "use_backend(name)") or AUTO)
    try:
        yield
    finally:
        _requested_stack.pop()


def requested_backend(explicit: Optional[str]) -> Optional[str]:
    """The backend asked for (None = auto), after the precedence rules."""
    if explicit is not None:
        return _check_name(explicit, "backend")
    if _requested_stack:
        return _check_name(_requested_stack[-1], "use_backend(name)")
    return _check_name(_env_backend() or None, ENV_VAR)


_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def _env_backend() -> Optional[str]:
    """os.environ.get(ENV_VAR), without its cost when the variable is unset (~0.7 us: the Mapping
    protocol raises and catches a KeyError): os.environ's own store is looked at first."""
    store = getattr(os.environ, "_data", None)
    if _ENV_KEY is not None and store is not None and _ENV_KEY not in store:
        return None
    return os.environ.get(ENV_VAR)


def no_scores(q, k) -> bool:
    """Queries q (..., L, E) and keys k (..., S, E) with no score between them: a zero-size dim
    other than the last (batch, heads, L or S). The result is all zeros (an empty output, or rows
    that see no key), with zero gradients and lse -inf: the reference gives it with plain PyTorch
    ops and no kernel ever sees it (torch's CPU kernels divide by the head count: zero heads kill
    the process with SIGFPE); torch draws no dropout for it either."""
    if q.numel() and k.numel():  # the common call, in ~0.1 us (the shape walk costs ~1 us)
        return False
    return 0 in q.shape[:-1] or 0 in k.shape[:-1]  # E = 0 alone leaves scores (all zero)


_EMPTY_BACKEND = ORACLE


def select(problem: AttentionProblem, explicit: Optional[str] = None) -> Backend:
    """The backend that serves `problem`: the requested one (which must be able to), else auto.
    A problem without scores (no_scores) is served by the reference whatever the request."""
    name = requested_backend(explicit)
    if name is not None:
        backend = BACKENDS[name]
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            raise NotImplementedError(
                f"backend {name!r} cannot serve this call: " + "; ".join(reasons)
            )
        return BACKENDS[_EMPTY_BACKEND] if no_scores(problem.q, problem.k) else backend
    if no_scores(problem.q, problem.k):
        return BACKENDS[_EMPTY_BACKEND]
    # an empty table costs nothing (reading q.device and the kind costs ~0.1 us a call)
    for candidate in auto_order(problem.q.device) if AUTO_ORDER else SPEED_ORDER:
        if UNAVAILABLE[candidate]:
            continue  # cannot run on this machine at all: no need to look at the problem
        backend = BACKENDS[candidate]
        auto_devices = backend.capabilities.auto_devices
        if auto_devices is not None and problem.q.device.type not in auto_devices:
            continue
        if not backend.not_supported_reasons(problem):
            return backend
    raise NotImplementedError(  # unreachable while the reference serves every valid problem
        "no backend can serve this call: "
        + "; ".join(f"{n}: {', '.join(BACKENDS[n].not_supported_reasons(problem))}" for n in SPEED_ORDER)
    )


def select_decode(problem, explicit: Optional[str] = None) -> Backend:
    """The backend for a decode problem (flash_attn_with_kvcache), by select()'s rules with each
    backend's decode_reasons. (select() keeps its own copy of the loop: it runs on every SDPA
    call, where one more call level and a getattr per backend cost ~0.5 us of a ~9 us budget.)"""
    name = requested_backend(explicit)
    candidates = (name,) if name is not None else auto_order(problem.q.device)
    for candidate in candidates:
        backend = BACKENDS[candidate]
        auto_devices = backend.capabilities.auto_devices
        if name is None and (UNAVAILABLE[candidate] or (
                auto_devices is not None and problem.q.device.type not in auto_devices)):
            continue
        reasons = backend.decode_reasons(problem)
        if not reasons:
            return backend
        if name is not None:
            raise NotImplementedError(f"backend {name!r} cannot serve this flash_attn_with_kvcache "
                                      "call: " + "; ".join(reasons))
    raise NotImplementedError(  # unreachable while the reference serves every valid problem
        "no backend can serve this flash_attn_with_kvcache call: " + "; ".join(
            f"{n}: {', '.join(BACKENDS[n].decode_reasons(problem))}" for n in SPEED_ORDER))


def forward_op(name: str):
    """The registered forward op of backend `name` (autograd included)."""
    return _ops[name][0]


# the inputs whose requires_grad asks for autograd: every tensor field (problem.FIELDS): the
# differentiable ones, and e.g. alibi_slopes (no gradient, as through the op, but the output must
# not record the kernel's own ops for it); integer tensors never require grad
_GRAD_TENSORS = ops.TENSOR_POSITIONS
functorch_active = torch._C._are_functorch_transforms_active
jit_tracing = torch._C._is_tracing  # torch.jit.is_tracing() without its Python wrapper
_autocast_enabled = torch._C._is_any_autocast_enabled
_function_modes = torch._C._len_torch_function_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _eager_mode() -> bool:
    """No torch.compile, torch.func transform, tracer, autocast, or torch-function/dispatch mode
    (those see the registered op)."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return False
    return (not _autocast_enabled() and not _function_modes() and not _dispatch_modes()
            and not functorch_active() and not jit_tracing())


def _plain_eager(problem: AttentionProblem) -> bool:
    """A call the eager path serves exactly as the op would: plain tensors, in _eager_mode()."""
    return _eager_mode() and type(problem.q) is torch.Tensor


def transforms_active() -> bool:
    """A torch.func transform (grad, vmap, jacrev, ...) or torch.jit.trace is running: the
    registered ops have no functorch rules, so such calls are computed another way (~0.2 us)."""
    return functorch_active() or jit_tracing()


def forward(name: str, problem: AttentionProblem):
    """(out, lse) of backend `name` on `problem`, with autograd: the registered op, or for a Python
    backend in plain eager mode the same kernel without the dispatcher's cost (ops.eager_kernels)."""
    if problem.attn_mask is not None:
        problem = with_dense_grad_mask(problem)
    eager = ops.eager_kernels(name)
    if eager is None or not _plain_eager(problem):
        return _ops[name][0](*problem)
    kernel, function = eager
    if torch.is_grad_enabled():
        for i in _GRAD_TENSORS:
            t = problem[i]
            if t is not None and t.requires_grad:
                return function.apply_problem(problem)
    return kernel(problem)


def output_and_backend(problem: AttentionProblem, explicit: Optional[str] = None):
    """Pick a backend for `problem` and run its forward (with autograd): returns
    (out (B, Hq, Tq, Ev), the name of the backend that served it)."""
    backend = select(problem, explicit)
    out, _lse = forward(backend.name, backend.prepare(problem))
    return out, backend.name


def available_backends() -> Dict[str, Optional[str]]:
    """{name: None if it can run on this machine, else the reason it cannot}."""
    return {name: UNAVAILABLE[name] for name in SPEED_ORDER}


def dropout_draw(dropout_p: float, q, k):
    """(dropout_p, seed) of a call with queries q (..., L, E) and keys k (..., S, E): neither
    dropout nor a seed when p is 0 or there is no score to drop (torch draws nothing then, so the
    generator is left as torch leaves it)."""
    if dropout_p <= 0 or no_scores(q, k):
        return 0.0, None
    return dropout_p, draw_dropout_seed()


def draw_dropout_seed() -> torch.Tensor:
    """A Philox seed/offset pair drawn from torch's default generator (so torch.manual_seed
    reproduces the dropout mask). It carries the generator's state from before the draw, for the
    `torch` backend, which replays torch's own dropout draw from it."""
    if torch.compiler.is_compiling():  # dynamo cannot trace get_state(); the seed alone serves
        return torch.randint(0, 2**62, (2,), dtype=torch.int64)
    state = torch.default_generator.get_state()
    seed = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    setattr(seed, STATE_ATTR, state)
    return seed


@contextlib.contextmanager
def forward_kernel_replaced(name: str, forward):
    """Within the block, backend `name`'s forward kernel (registered op and eager path) is
    `forward` (called with the problem's arguments): the bench's overhead suite measures the
    Python side of a call with the kernel stubbed out."""
    real = _ops[name]
    _ops[name] = (forward, real[1])
    _streams_off.append(name)  # the stream plan calls its kernels itself: the op path serves
    try:
        with ops.eager_forward_replaced(name, forward):
            yield
    finally:
        _ops[name] = real
        _streams_off.pop()


# ---- the `torch` backend on the caller's unpacked streams (backends/torch_streams.py) ----------

_STREAMS_BACKEND = "torch"
# nn.Parameter has torch_function disabled: a gate or bias that is a module's parameter is plain
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_streams_off: list = []  # inside forward_kernel_replaced(): the op path serves every call


@contextlib.contextmanager
def packed_streams():
    """Within the block, every multi-stream call is packed and served through the backend's op
    path, never on the caller's streams (the tests compare both routes; the bench times both)."""
    _streams_off.append(True)
    try:
        yield
    finally:
        _streams_off.pop()


def streams_may_serve(device: torch.device, explicit: Optional[str]) -> bool:
    """Whether a multi-stream call on `device` may be computed on the caller's unpacked streams:
    plain eager mode (checked again on the tensors by caller_streams_serve), and auto on the CPU
    (where auto's choice looks at no tensor's strides) or the `torch` backend asked for."""
    if _streams_off or not _eager_mode():
        return False
    name = requested_backend(explicit)
    return name == _STREAMS_BACKEND or (name is None and device.type == "cpu")


def caller_streams_serve(problem: AttentionProblem, explicit: Optional[str], tensors) -> bool:
    """Whether the `torch` backend computes `problem` on the caller's streams (torch_streams.py).
    `problem`'s q, k, v are shape placeholders (api.peer_attention); `tensors` are the caller's
    (plain tensors only: a subclass sees the registered op). Raises as select() does when the
    backend asked for cannot serve."""
    if any(type(t) not in _PLAIN_TENSORS for t in tensors if t is not None):
        return False
    return select(problem, explicit).name == _STREAMS_BACKEND and torch_streams.serves(problem)


def caller_streams_outputs(problem: AttentionProblem, queries, keys, values):
    return torch_streams.stream_outputs(problem, queries, keys, values)
