"""The registered ops: every backend's forward and backward as torch.library custom ops.

For each backend NAME there are two ops in the `peer_attention` namespace:

    peer_attention::NAME_fwd(<problem>) -> (Tensor out, Tensor lse)
    peer_attention::NAME_bwd(Tensor grad_out, Tensor out, Tensor lse, <problem>, bool[] needs_grad,
                             SymInt[]? dmask_shape=None)
        -> (Tensor dq, Tensor dk, Tensor dv, Tensor dgate, Tensor dbias, Tensor dmask, Tensor dsinks)

where <problem> is the argument list of the problem's field table (problem.FIELDS), from which the
schema, the saved-tensor and gradient positions and the autocast casts below are derived. The schema,
the fake (meta) implementations and the autograd formula (a thin call of NAME_bwd; with
create_graph=True the differentiable formulas of double_backward.py) live here, once for all
backends. A backend only supplies the real kernels: Python backends through
`register_python_kernels` (which also gives them an eager path, below), the compiled extension through
`TORCH_LIBRARY_IMPL(peer_attention, CUDA, m) { m.impl("cuda_fwd", ...); m.impl("cuda_bwd", ...); }`
(argument types: int[] -> IntArrayRef, SymInt[] -> IntArrayRef, bool[] -> c10::List<bool>,
float -> double, str -> c10::string_view, Tensor? -> std::optional<Tensor>).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .double_backward import differentiable_grads
from .problem import (AUTOCAST_POSITIONS, FIELDS, GRAD_POSITIONS, NUM_FIELDS, OPTION_POSITIONS,
                      TENSOR_POSITIONS, AttentionProblem, lse_dtype, lse_shape,
                      mask_grad_shape)
# re-exported for the backends that import it from here; it lives in problem.py, below every
# backend (backends/torch_dropout.py importing it from here closed the cycle ops ->
# double_backward -> backends/torch_dropout -> ops)
from .problem import empty_grad  # noqa: F401

NAMESPACE = "peer_attention"

# "Tensor q, Tensor k, ..., Tensor? sinks": the compiled extension (csrc/binding.cpp) implements
# this signature, so it changes only with the field table (tests/test_problem.py pins it)
PROBLEM_SCHEMA = ", ".join(f"{f.schema} {f.name}" for f in FIELDS)
NUM_PROBLEM_ARGS = NUM_FIELDS
# positions, within the problem arguments, of the inputs that can receive a gradient (q, k, v,
# gate, bias, attn_mask, sinks): the backward op returns their gradients in this order
GRAD_INPUTS = GRAD_POSITIONS
FWD_SCHEMA = f"({PROBLEM_SCHEMA}) -> (Tensor, Tensor)"
BWD_SCHEMA = (
    f"(Tensor grad_out, Tensor out, Tensor lse, {PROBLEM_SCHEMA}, bool[] needs_grad, "
    f"SymInt[]? dmask_shape=None) "
    f"-> ({', '.join(['Tensor'] * len(GRAD_INPUTS))})"
)

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


# The float mask's gradient (problem.py): a backend's backward may return it at any shape that
# sums to mask_grad_shape(attn_mask), the mask's own shape with 1 where it is broadcast (stride
# 0). The backward op returns it at `dmask_shape`, which the autograd formula takes from the
# saved mask's strides when it calls the op: a number, not a stride the op's inputs must keep
# (inductor may hand the op a materialised mask; the fake kernel then still knows the shape).
# None (a direct call): the mask's own mask_grad_shape.
MASK_ARG = next(i for i, f in enumerate(FIELDS) if f.name == "attn_mask")
_MASK_GRAD = GRAD_INPUTS.index(MASK_ARG)  # its gradient's place among the backward's outputs


def grad_at_shape(grad: Tensor, shape) -> Tensor:
    """A mask gradient at `shape`: summed down to it, or, where it is at a more compact shape
    (summed over copies that `shape` holds), a stride-0 view of equal shares of it. Only the
    expand() that made those copies may read such shares: it sums them back (see
    problem.with_dense_grad_mask, which copies any other broadcast mask dense)."""
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    if all(want in (got, 1) for want, got in zip(shape, grad.shape)):
        return grad.sum_to_size(shape)
    grad = grad.sum_to_size(tuple(min(g, n) for g, n in zip(grad.shape, shape)))
    copies = math.prod(shape) // grad.numel() if grad.numel() else 1
    return (grad / copies if copies > 1 else grad).expand(shape)


def mask_grad_for_input(grad, mask: Tensor):
    """The gradient autograd gets for the (expanded) mask input from a dmask at any shape (a
    dense one as it is; a compact one as equal shares, summed back by the expand())."""
    return grad if grad is None else grad_at_shape(grad, mask.shape)


def dmask_shape_of(args, needs) -> Optional[list]:
    """The backward op's dmask_shape argument for a call whose problem arguments are `args`."""
    mask = args[MASK_ARG]
    return list(mask_grad_shape(mask)) if needs[_MASK_GRAD] and mask is not None else None


def _grad_shape(arg: Tensor, position: int, dmask_shape):
    if position != MASK_ARG:
        return arg.shape
    return mask_grad_shape(arg) if dmask_shape is None else dmask_shape


def _dmask_shape_arg(rest):
    """The backward op's dmask_shape from its arguments after lse (None when not passed)."""
    return rest[NUM_PROBLEM_ARGS + 1] if len(rest) > NUM_PROBLEM_ARGS + 1 else None


_defined: dict = {}


def _fake_fwd(*args):
    p = AttentionProblem._make(args)
    q = p.q
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], p.v.shape[-1]))
    lse = q.new_empty(lse_shape(q, len(p.q_lens), p.normalize), dtype=lse_dtype(q.dtype))
    return out, lse


def _fake_bwd(grad_out, out, lse, *rest):
    args, needs_grad = rest[:NUM_PROBLEM_ARGS], rest[NUM_PROBLEM_ARGS]
    dmask_shape = _dmask_shape_arg(rest)
    q = args[0]
    # a new tensor per output (outputs of a custom op must not alias each other): the input's
    # shape where its gradient is wanted, else empty
    return tuple(
        args[i].new_empty(_grad_shape(args[i], i, dmask_shape)) if (args[i] is not None and need)
        else q.new_empty(0)
        for i, need in zip(GRAD_INPUTS, needs_grad)
    )


# problem arguments saved as tensors (q k v gate bias kv_lengths mask seed alibi_slopes sinks), and
# the static ones kept on the context
_SAVED_TENSORS = TENSOR_POSITIONS
_STATIC_ARGS = OPTION_POSITIONS


def _setup_context(ctx, inputs, output):
    out, lse = output
    tensors = [inputs[i] for i in _SAVED_TENSORS]
    ctx.save_for_backward(out, lse, *tensors)
    ctx.static_args = [inputs[i] for i in _STATIC_ARGS]
    ctx.mark_non_differentiable(lse)
    # no zero-filled gradient for the lse (never used): a parallel fill costs milliseconds when
    # the OpenMP workers of a loaded CPU must be woken for it
    ctx.set_materialize_grads(False)



def _problem_from_ctx(ctx):
    out, lse, *tensors = ctx.saved_tensors
    args = [None] * NUM_PROBLEM_ARGS
    for i, t in zip(_SAVED_TENSORS, tensors):
        args[i] = t
    for i, value in zip(_STATIC_ARGS, ctx.static_args):
        args[i] = value
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
            result = differentiable_grads(name, AttentionProblem._make(args), grad_out,
                                          [args[i] for i in GRAD_INPUTS], needs)
        else:
            result = bwd_op(grad_out, out, lse, *args, needs, dmask_shape_of(args, needs))
        grads = [None] * NUM_PROBLEM_ARGS
        for slot, grad, needed in zip(GRAD_INPUTS, result, needs):
            if needed:
                grads[slot] = grad
        grads[MASK_ARG] = mask_grad_for_input(grads[MASK_ARG], args[MASK_ARG])
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
_AUTOCAST_FWD_ARGS = AUTOCAST_POSITIONS  # q, k, v, attn_mask


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


def backend_ops(name: str):
    """(NAME_fwd, NAME_bwd) of a registered backend (KeyError for a name dispatch never defined)."""
    return _defined[name]


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
# directly when no gradient is wanted, and through a torch.autograd.Function with the op's
# backward (NAME_bwd's kernel, or the create_graph formulas) when one is. Its outputs keep the
# layouts the backend's forward returned (no copy the composition does not make); the op's own
# kernels make them contiguous, as its fake kernel declares.
_eager: dict = {}

# The eager Function's inputs: the problem (a plain argument, whose option fields the context keeps)
# and its tensor fields (problem.TENSOR_POSITIONS), so that autograd sees every tensor that may
# require grad. Ten tensors instead of the op's 21 arguments: Function.apply looks at each one.
_EAGER_TENSORS = _SAVED_TENSORS
# where each differentiable field (GRAD_INPUTS) sits among the eager Function's inputs
_EAGER_GRAD_SLOTS = tuple(1 + _EAGER_TENSORS.index(i) for i in GRAD_INPUTS)
_EAGER_NUM_INPUTS = 1 + len(_EAGER_TENSORS)
_EAGER_MASK_SLOT = 1 + _EAGER_TENSORS.index(MASK_ARG)
_NO_EAGER_GRADS = (None,) * _EAGER_NUM_INPUTS


def _eager_function(name: str, forward, python_backward, bwd_op):
    def eager_forward(ctx, problem, *tensors):
        out, lse = forward(problem)
        ctx.save_for_backward(out, lse, *tensors)
        ctx.static_args = [problem[i] for i in _STATIC_ARGS]
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # as _setup_context: no zero gradient for the lse
        return out, lse

    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # the output took no part in what is differentiated
            return _NO_EAGER_GRADS
        out, lse, args = _problem_from_ctx(ctx)
        needs_input = ctx.needs_input_grad
        needs = [needs_input[slot] for slot in _EAGER_GRAD_SLOTS]
        if torch.is_grad_enabled():  # create_graph=True: as the op's backward (_make_backward)
            result = differentiable_grads(name, AttentionProblem._make(args), grad_out,
                                          [args[i] for i in GRAD_INPUTS], needs)
        elif torch._C._is_any_autocast_enabled():  # the op shields the kernels from autocast
            result = bwd_op(grad_out, out, lse, *args, needs, dmask_shape_of(args, needs))
        else:  # NAME_bwd without the dispatcher (and without the contiguous copies its fake
            # kernel's strides ask for); None may stand for a gradient that is not needed
            result = python_backward(AttentionProblem._make(args), grad_out, out, lse, needs)
        grads = [None] * _EAGER_NUM_INPUTS
        for slot, grad, needed in zip(_EAGER_GRAD_SLOTS, result, needs):
            if needed:
                grads[slot] = grad
        grads[_EAGER_MASK_SLOT] = mask_grad_for_input(grads[_EAGER_MASK_SLOT], args[MASK_ARG])
        return tuple(grads)

    # old-style forward(ctx, ...): Function.apply binds default arguments through inspect.signature
    # (~20 us) when a separate setup_context is defined
    function = type(f"{name}_eager", (torch.autograd.Function,),
                    {"forward": staticmethod(eager_forward), "backward": staticmethod(backward)})
    # the C implementation behind Function.apply: its Python wrapper only binds default arguments
    # (there are none) and unwraps functorch's wrappers (the eager path runs without transforms)
    c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, function)

    def apply(problem: AttentionProblem):
        """(out, lse) of `problem` with autograd through the eager Function."""
        return c_apply(problem, *[problem[i] for i in _EAGER_TENSORS])

    function.apply_problem = staticmethod(apply)
    return function


@contextlib.contextmanager
def eager_forward_replaced(name: str, forward):
    """Within the block, backend `name`'s eager forward is `forward` (the bench's overhead
    suite times the Python side with the kernel stubbed out)."""
    real = _eager.get(name)
    if real is not None:
        _eager[name] = (forward, real[1])
    try:
        yield
    finally:
        if real is not None:
            _eager[name] = real


def eager_kernels(name: str):
    """(forward(problem), autograd.Function) of a Python backend; None for compiled kernels."""
    return _eager.get(name)


def _contiguous_outputs(out: Tensor, lse: Tensor):
    return out.contiguous(), lse.contiguous()


def register_python_kernels(
    name: str,
    forward: Callable[[AttentionProblem], tuple],
    backward: Callable[..., tuple],
    dispatch_key: str = "CompositeExplicitAutograd",
    op_outputs: Callable[[Tensor, Tensor], tuple] = None,
):
    """Serve NAME_fwd / NAME_bwd with Python functions of the normalised problem.

    forward(problem) -> (out, lse), in any layout (the eager path keeps it);
    backward(problem, grad_out, out, lse, needs_grad) -> (dq, dk, dv, dgate, dbias, dmask, dsinks),
    None allowed where needs_grad is False, dmask at any shape that sums to
    problem.mask_grad_shape(attn_mask) (the op returns it at that shape);
    op_outputs(out, lse) -> (out, lse) contiguous, for the op (default: Tensor.contiguous).
    """
    if op_outputs is None:
        op_outputs = _contiguous_outputs
    _fwd_op, bwd_op = define_backend_ops(name)
    _eager[name] = (forward, _eager_function(name, forward, backward, bwd_op))

    def fwd_kernel(*args):
        # contiguous, as the fake kernel declares (the eager path keeps the kernels' layouts)
        return op_outputs(*forward(AttentionProblem._make(args)))

    def bwd_kernel(grad_out, out, lse, *rest):
        problem, needs_grad = AttentionProblem._make(rest[:NUM_PROBLEM_ARGS]), rest[NUM_PROBLEM_ARGS]
        dmask_shape = _dmask_shape_arg(rest)
        grads = backward(problem, grad_out, out, lse, list(needs_grad))
        # contiguous, as the fake kernel declares (inductor asserts the strides it was promised);
        # an empty tensor where the backend returned None (a gradient nobody asked for)
        q = problem.q
        grads = list(grads)
        dmask = grads[_MASK_GRAD]
        if dmask is not None and needs_grad[_MASK_GRAD] and problem.attn_mask is not None:
            grads[_MASK_GRAD] = grad_at_shape(
                dmask, _grad_shape(problem.attn_mask, MASK_ARG, dmask_shape))
        return tuple(empty_grad(q) if g is None else g.contiguous() for g in grads)

    _lib.impl(f"{name}_fwd", fwd_kernel, dispatch_key)
    _lib.impl(f"{name}_bwd", bwd_kernel, dispatch_key)


