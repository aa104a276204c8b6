"""The registered ops: every backend's forward and backward as torch.library custom ops.

For each backend NAME there are two ops in the `peer_attention` namespace:

    peer_attention::NAME_fwd(<problem>) -> (Tensor out, Tensor lse)
    peer_attention::NAME_bwd(Tensor grad_out, Tensor out, Tensor lse, <problem>, bool[] needs_grad)
        -> (Tensor dq, Tensor dk, Tensor dv, Tensor dgate, Tensor dbias, Tensor dmask, Tensor dsinks)

where <problem> is the argument list below, in the order of AttentionProblem's fields. The schema,
the fake (meta) implementations and the autograd formula (a thin call of NAME_bwd; with
create_graph=True the differentiable formulas of double_backward.py) live here, once for all
backends. A backend only supplies the real kernels: Python backends through
`register_python_kernels` (which also gives them an eager path, below), the compiled extension through
`TORCH_LIBRARY_IMPL(peer_attention, CUDA, m) { m.impl("cuda_fwd", ...); m.impl("cuda_bwd", ...); }`
(argument types: int[] -> IntArrayRef, SymInt[] -> IntArrayRef, bool[] -> c10::List<bool>,
float -> double, str -> c10::string_view, Tensor? -> std::optional<Tensor>).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .double_backward import differentiable_grads
from .problem import AttentionProblem, lse_dtype, lse_shape

NAMESPACE = "peer_attention"

PROBLEM_SCHEMA = (
    "Tensor q, Tensor k, Tensor v, SymInt[] q_lens, SymInt[] kv_lens, int[] peers, "
    "Tensor? gate, Tensor? bias, Tensor? kv_lengths, Tensor? attn_mask, Tensor? dropout_seed, "
    "float dropout_p, bool is_causal, float scale, str normalize, "
    "int window_left, int window_right, bool bottom_right, float softcap, "
    "Tensor? alibi_slopes, Tensor? sinks"
)
FWD_SCHEMA = f"({PROBLEM_SCHEMA}) -> (Tensor, Tensor)"
BWD_SCHEMA = (
    f"(Tensor grad_out, Tensor out, Tensor lse, {PROBLEM_SCHEMA}, bool[] needs_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
NUM_PROBLEM_ARGS = 21
# positions, within the problem arguments, of the inputs that can receive a gradient
GRAD_INPUTS = (0, 1, 2, 6, 7, 9, 20)  # q, k, v, gate, bias, attn_mask, sinks

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_defined: dict = {}


def _fake_fwd(q, k, v, q_lens, kv_lens, peers, gate, bias, kv_lengths, attn_mask, dropout_seed,
              dropout_p, is_causal, scale, normalize, *variants):
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    lse = q.new_empty(lse_shape(q, len(q_lens), normalize), dtype=lse_dtype(q.dtype))
    return out, lse


def _fake_bwd(grad_out, out, lse, q, k, v, q_lens, kv_lens, peers, gate, bias, kv_lengths,
              attn_mask, dropout_seed, dropout_p, is_causal, scale, normalize, window_left,
              window_right, bottom_right, softcap, alibi_slopes, sinks, needs_grad):
    nq, nk, nv, ng, nb, nm, ns = needs_grad

    def empty():  # a new tensor per output: outputs of a custom op must not alias each other
        return q.new_empty(0)

    return (
        q.new_empty(q.shape) if nq else empty(),
        k.new_empty(k.shape) if nk else empty(),
        v.new_empty(v.shape) if nv else empty(),
        gate.new_empty(gate.shape) if (gate is not None and ng) else empty(),
        bias.new_empty(bias.shape) if (bias is not None and nb) else empty(),
        attn_mask.new_empty(attn_mask.shape) if (attn_mask is not None and nm) else empty(),
        sinks.new_empty(sinks.shape) if (sinks is not None and ns) else empty(),
    )


# problem arguments saved as tensors: q k v gate bias kv_lengths mask seed alibi_slopes sinks
_SAVED_TENSORS = (0, 1, 2, 6, 7, 8, 9, 10, 19, 20)


def _setup_context(ctx, inputs, output):
    out, lse = output
    tensors = [inputs[i] for i in _SAVED_TENSORS]
    ctx.save_for_backward(out, lse, *tensors)
    ctx.static_args = [inputs[i] for i in range(NUM_PROBLEM_ARGS) if i not in _SAVED_TENSORS]
    ctx.mark_non_differentiable(lse)
    # no zero-filled gradient for the lse (never used): a parallel fill costs milliseconds when
    # the OpenMP workers of a loaded CPU must be woken for it
    ctx.set_materialize_grads(False)



def _problem_from_ctx(ctx):
    out, lse, *tensors = ctx.saved_tensors
    args = [None] * NUM_PROBLEM_ARGS
    for i, t in zip(_SAVED_TENSORS, tensors):
        args[i] = t
    statics = iter(ctx.static_args)
    for i in range(NUM_PROBLEM_ARGS):
        if i not in _SAVED_TENSORS:
            args[i] = next(statics)
    return out, lse, args


def _make_backward(name, bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # the output took no part in what is differentiated
            return (None,) * NUM_PROBLEM_ARGS
        out, lse, args = _problem_from_ctx(ctx)
        needs = [ctx.needs_input_grad[i] for i in GRAD_INPUTS]
        if torch.is_grad_enabled():
            # create_graph=True: the kernel's gradients would have no history (a silently zero
            # second order); differentiable formulas from the saved tensors instead
            result = differentiable_grads(name, AttentionProblem(*args), grad_out,
                                          [args[i] for i in GRAD_INPUTS], needs)
        else:
            result = bwd_op(grad_out, out, lse, *args, needs)
        grads = [None] * NUM_PROBLEM_ARGS
        for slot, grad, needed in zip(GRAD_INPUTS, result, needs):
            if needed:
                grads[slot] = grad
        return tuple(grads)

    return backward


# Autocast: the ops behave like torch's SDPA under torch.autocast: q, k, v and a float attn_mask
# are cast to the autocast dtype (float64 excepted), and the kernels (the reference's PyTorch ops
# included) then run with autocast off, in the dtype they were given. The backward op is only
# shielded from autocast.
_AUTOCAST_KEYS = tuple(
    (device_type, key) for device_type, key in
    (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA"), ("xpu", "AutocastXPU"),
     ("mps", "AutocastMPS"))
    if hasattr(torch._C.DispatchKey, key)  # the devices torch's SDPA autocasts on
)
_AUTOCAST_FWD_ARGS = (0, 1, 2, 9)  # q, k, v, attn_mask


def _autocast_kernel(op, device_type: str, cast_positions):
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = list(args)
        for i in cast_positions:
            t = args[i]
            if t is not None and t.is_floating_point() and t.dtype != torch.float64:
                args[i] = t.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return op(*args)

    return kernel


def define_backend_ops(name: str):
    """Define NAME_fwd / NAME_bwd with their fake implementations and autograd; idempotent."""
    if name in _defined:
        return _defined[name]
    fwd_name, bwd_name = f"{name}_fwd", f"{name}_bwd"
    _lib.define(fwd_name + FWD_SCHEMA)
    _lib.define(bwd_name + BWD_SCHEMA)
    qualified_fwd, qualified_bwd = f"{NAMESPACE}::{fwd_name}", f"{NAMESPACE}::{bwd_name}"
    torch.library.register_fake(qualified_fwd, _fake_fwd, lib=_lib)
    torch.library.register_fake(qualified_bwd, _fake_bwd, lib=_lib)
    fwd_op = getattr(torch.ops.peer_attention, fwd_name).default
    bwd_op = getattr(torch.ops.peer_attention, bwd_name).default
    torch.library.register_autograd(
        qualified_fwd, _make_backward(name, bwd_op), setup_context=_setup_context, lib=_lib
    )
    for device_type, key in _AUTOCAST_KEYS:
        _lib.impl(fwd_name, _autocast_kernel(fwd_op, device_type, _AUTOCAST_FWD_ARGS), key)
        _lib.impl(bwd_name, _autocast_kernel(bwd_op, device_type, ()), key)
    _defined[name] = (fwd_op, bwd_op)
    return fwd_op, bwd_op


# The eager path of a Python backend: the same forward kernel, reached without the dispatcher.
# Calling a custom op from Python costs about 25 us (its 21 arguments are parsed into the
# dispatcher's values and back into Python objects, twice: the autograd kernel redispatches), and
# register_autograd's Python wrapper adds about 150 us more when an input requires grad; a call of
# tens of microseconds of kernel then spends most of its time there. In eager mode (dispatch.forward
# decides: no compile, transform, tracer, autocast, mode or tensor subclass) the kernel is called
# directly when no gradient is wanted, and through a torch.autograd.Function with the op's own
# setup_context and backward (NAME_bwd, or the create_graph formulas) when one is.
_eager: dict = {}


def _eager_function(name: str, forward, python_backward, bwd_op):
    def direct_bwd(grad_out, out, lse, *rest):
        """NAME_bwd without the dispatcher (and without the op's contiguous copies, which only
        its fake kernel's strides ask for); under autocast the op, which shields the kernels."""
        if torch._C._is_any_autocast_enabled():
            return bwd_op(grad_out, out, lse, *rest)
        problem = AttentionProblem(*rest[:NUM_PROBLEM_ARGS])
        return python_backward(problem, grad_out, out, lse, list(rest[NUM_PROBLEM_ARGS]))

    backward = _make_backward(name, direct_bwd)

    def eager_forward(ctx, *args):
        output = forward(AttentionProblem(*args))
        _setup_context(ctx, args, output)
        return output

    # old-style forward(ctx, ...): Function.apply binds default arguments through inspect.signature
    # (~20 us) when a separate setup_context is defined
    return type(f"{name}_eager", (torch.autograd.Function,),
                {"forward": staticmethod(eager_forward), "backward": staticmethod(backward)})


def eager_kernels(name: str):
    """(forward(problem), autograd.Function) of a Python backend; None for compiled kernels."""
    return _eager.get(name)


def register_python_kernels(
    name: str,
    forward: Callable[[AttentionProblem], tuple],
    backward: Callable[..., tuple],
    dispatch_key: str = "CompositeExplicitAutograd",
):
    """Serve NAME_fwd / NAME_bwd with Python functions of the normalised problem.

    forward(problem) -> (out, lse);
    backward(problem, grad_out, out, lse, needs_grad) -> (dq, dk, dv, dgate, dbias, dmask, dsinks).
    """
    _fwd_op, bwd_op = define_backend_ops(name)
    _eager[name] = (forward, _eager_function(name, forward, backward, bwd_op))

    def fwd_kernel(*args):
        return forward(AttentionProblem(*args))

    def bwd_kernel(grad_out, out, lse, *rest):
        problem, needs_grad = AttentionProblem(*rest[:NUM_PROBLEM_ARGS]), rest[NUM_PROBLEM_ARGS]
        grads = backward(problem, grad_out, out, lse, list(needs_grad))
        # contiguous, as the fake kernel declares (inductor asserts the strides it was promised)
        return tuple(g.contiguous() for g in grads)

    _lib.impl(f"{name}_fwd", fwd_kernel, dispatch_key)
    _lib.impl(f"{name}_bwd", bwd_kernel, dispatch_key)


def empty_grad(like: Tensor) -> Tensor:
    """The placeholder a backward returns for a gradient nobody asked for."""
    return like.new_empty(0)
