"""The normalised attention problem: the one shape every backend sees.

Both public operations reduce to this (SDPA is the one-stream case):

    q     (B, Hq, Tq, E)    the S query streams packed along dim 2, Tq = sum(q_lens)
    k     (B, H,  Tk, E)    the S key streams packed along dim 2,   Tk = sum(kv_lens)
    v     (B, H,  Tk, Ev)
    q_lens, kv_lens         per-stream lengths (offsets are their prefix sums)
    peers                   S*S ints, row-major: peers[s * S + p] = 1 iff stream s attends to p
    gate  (B, S, S, Hq, Ev) or None: an expand()ed view, broadcast dims have stride 0
    bias  (B, S, S, Hq)     or None: an expand()ed view
    kv_lengths (B, S)       or None: keys of stream p at positions >= kv_lengths[b, p] are padding
    attn_mask (B, Hq, Tq, Tk) or None (S == 1 only): bool (True = may attend) or float (added),
                            usually an expand()ed view
    dropout_seed            None, or an int64 CPU tensor [seed, offset] (S == 1 only)
    dropout_p, is_causal (self pairs), scale, normalize ("joint" | "peer")
    window_left, window_right  band on the self pairs (-1 = unbounded; is_causal = right 0)
    bottom_right            alignment of causal/window/ALiBi on the self pairs: with
                            off = M_s - L_s (bottom-right) or 0 (top-left), query i of stream s
                            may see key j of s iff i + off - left <= j <= i + off + right
    softcap                 0, or z = softcap * tanh(scale * q.k / softcap) before bias and masks
    alibi_slopes (B, Hq)    or None: float32 view, - slope * |i + off - j| added on the self pairs
    sinks (Hq,)             or None ("joint" only): a per-head logit in every row's normaliser
                            with no value; the saved lse includes it

The peer table may be empty: `peers == ()` with S > 1 means the diagonal table (stream s attends
to itself only), the varlen case, so that thousands of sequences cost no S*S table.

GQA is implied by Hq != H: query head h reads key/value head h // (Hq / H).

A backend's forward returns (out (B, Hq, Tq, Ev) in q's dtype, lse), where lse is the natural-log
sum-exp of each row's scores, float32 (float64 for float64 inputs): (B, Hq, Tq) for "joint",
(B, Hq, S, Tq) for "peer" (-inf where a row has nothing to attend to). Its backward returns the
seven gradients (dq, dk, dv, dgate, dbias, dmask, dsinks) shaped like those inputs (gate/bias in their
full expanded shape; autograd of the expand sums them down), or empty tensors where not needed.
dmask may come back at any shape that sums (Tensor.sum_to_size) to mask_grad_shape(attn_mask): the
mask's own shape, 1 on every dim it is broadcast along (stride 0), so that a broadcast mask's
gradient is accumulated at its own size, not as a dense (B, Hq, Tq, Tk) float32 buffer (8 GiB at
B*H = 32, L = 8k). The registered op returns it at mask_grad_shape, and its autograd formula hands
it to the expand (ops.mask_grad_for_input).
"""
from __future__ import annotations

import collections
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

JOINT, PEER = "joint", "peer"
NORMALIZE_MODES = (JOINT, PEER)

# The roles of the problem's fields (the arguments of the registered ops, in this order):
DIFFERENTIABLE = "differentiable"  # a tensor that gets a gradient (saved for the backward)
TENSOR = "tensor"                  # a tensor input without a gradient (saved for the backward)
OPTION = "option"                  # a static value: lengths, peer table, flags, numbers
_REQUIRED = object()


class Field(NamedTuple):
    name: str
    schema: str                # its type in the ops' schema (ops.py)
    role: str                  # DIFFERENTIABLE, TENSOR or OPTION
    default: object = _REQUIRED  # a field with a default is a variant (SPEC section 9): the
    #                            default is plain attention
    autocast: bool = False     # cast to the autocast dtype under torch.autocast, as torch's SDPA


# THE problem, declared once. The ops' schema, the saved-tensor and gradient positions, the fake
# and autocast kernels (ops.py), the tensors whose requires_grad asks for autograd (dispatch.py)
# and AttentionProblem itself are derived from this table. A new variant flag is one line here
# (with its default: plain attention), its validation, and the backends that serve it; appending
# it changes the compiled extension's op signature (csrc/binding.cpp) too.
FIELDS: Tuple[Field, ...] = (
    Field("q", "Tensor", DIFFERENTIABLE, autocast=True),
    Field("k", "Tensor", DIFFERENTIABLE, autocast=True),
    Field("v", "Tensor", DIFFERENTIABLE, autocast=True),
    Field("q_lens", "SymInt[]", OPTION),
    Field("kv_lens", "SymInt[]", OPTION),
    Field("peers", "int[]", OPTION),
    Field("gate", "Tensor?", DIFFERENTIABLE),
    Field("bias", "Tensor?", DIFFERENTIABLE),
    Field("kv_lengths", "Tensor?", TENSOR),
    Field("attn_mask", "Tensor?", DIFFERENTIABLE, autocast=True),
    Field("dropout_seed", "Tensor?", TENSOR),
    Field("dropout_p", "float", OPTION),
    Field("is_causal", "bool", OPTION),
    Field("scale", "float", OPTION),
    Field("normalize", "str", OPTION),
    # variants (SPEC section 9)
    Field("window_left", "int", OPTION, -1),
    Field("window_right", "int", OPTION, -1),
    Field("bottom_right", "bool", OPTION, False),
    Field("softcap", "float", OPTION, 0.0),
    Field("alibi_slopes", "Tensor?", TENSOR, None),
    Field("sinks", "Tensor?", DIFFERENTIABLE, None),
)

FIELD_NAMES: Tuple[str, ...] = tuple(f.name for f in FIELDS)
NUM_FIELDS = len(FIELDS)
# positions in the field order (= the ops' argument order)
GRAD_POSITIONS: Tuple[int, ...] = tuple(i for i, f in enumerate(FIELDS) if f.role == DIFFERENTIABLE)
TENSOR_POSITIONS: Tuple[int, ...] = tuple(i for i, f in enumerate(FIELDS) if f.role != OPTION)
OPTION_POSITIONS: Tuple[int, ...] = tuple(i for i, f in enumerate(FIELDS) if f.role == OPTION)
AUTOCAST_POSITIONS: Tuple[int, ...] = tuple(i for i, f in enumerate(FIELDS) if f.autocast)
VARIANTS: Tuple[Field, ...] = tuple(f for f in FIELDS if f.default is not _REQUIRED)


def _variant_test():
    """has_variants, generated from the table: any variant field off its default. It runs on
    every call's backend selection, so it is spelled out once as plain attribute tests."""
    tests = [f"self.{f.name} is not None" if f.default is None else f"self.{f.name} != {f.default!r}"
             for f in VARIANTS]
    namespace: dict = {}
    exec(f"def has_variants(self):\n    return {' or '.join(tests) or 'False'}\n", namespace)
    return namespace["has_variants"]


class _ProblemMethods:
    """The methods of AttentionProblem (below), which is the namedtuple of FIELDS."""

    def op_args(self) -> tuple:
        return tuple(self)

    @property
    def num_streams(self) -> int:
        return len(self.q_lens)

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    @property
    def num_q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    def stream_offsets(self, lens: Tuple[int, ...]):
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        return offsets

    @property
    def diagonal_peers(self) -> bool:
        """The varlen table: every stream attends to itself only (stored as peers == ())."""
        return len(self.peers) == 0

    def attends(self, s: int, p: int) -> bool:
        if not self.peers:
            return s == p
        return bool(self.peers[s * self.num_streams + p])

    def peers_flat(self) -> Tuple[int, ...]:
        """The S*S table, the diagonal one spelled out."""
        if self.peers:
            return self.peers
        n = self.num_streams
        return tuple(int(s == p) for s in range(n) for p in range(n))

    def peers_nested(self):
        n = self.num_streams
        return [[self.attends(s, p) for p in range(n)] for s in range(n)]

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    has_variants = property(_variant_test(), doc="Any SPEC section 9 option beyond plain "
                            "attention: a variant field (FIELDS) off its default.")

    def self_offset(self, s: int) -> int:
        """Diagonal offset of stream s's self pair: M_s - L_s bottom-right, 0 top-left."""
        return self.kv_lens[s] - self.q_lens[s] if self.bottom_right else 0


# A plain namedtuple, as typing.NamedTuple makes one (its methods set on the class): cheap to build
# on every call, `op(*problem)` passes it straight to an op, and torch.compile treats it as a
# namedtuple. Build it with keywords, `AttentionProblem(q=..., k=..., ...)` (tests/test_problem.py
# rejects a positional construction in the sources), or with `AttentionProblem._make(args)` from
# op arguments in FIELDS order.
AttentionProblem = collections.namedtuple(
    "AttentionProblem", FIELD_NAMES, defaults=[f.default for f in VARIANTS], module=__name__)
for _name, _value in vars(_ProblemMethods).items():
    if not _name.startswith("__"):
        setattr(AttentionProblem, _name, _value)
AttentionProblem.__doc__ = ("The normalised attention problem (see peer_attention.problem): the "
                            "fields of FIELDS, in that order.")
del _name, _value


def problem_builder(*names: str, **constants):
    """A fast constructor for a hot call site: `build = problem_builder("q", "k", ..., peers=(1,))`
    returns build(q, k, ...), which takes the fields `names` in the order given here and fills
    every other field from `constants` or its default. The call site names its fields (the table's
    order is written nowhere else) at the cost of a plain function call: AttentionProblem(**) with
    16 keywords costs ~1.5 us more a call, over a tenth of an SDPA call's Python budget."""
    unknown = [n for n in names + tuple(constants) if n not in FIELD_NAMES]
    missing = [f.name for f in FIELDS if f.default is _REQUIRED
               and f.name not in names and f.name not in constants]
    if unknown or missing or len(set(names)) != len(names) or set(names) & set(constants):
        raise ValueError(f"problem_builder: unknown fields {unknown}, missing fields {missing}, "
                         "or a field named twice")
    defaults = {f.name: f.default for f in VARIANTS}
    namespace = {"_new": tuple.__new__, "_cls": AttentionProblem}
    values = []
    for f in FIELDS:
        if f.name in names:
            values.append(f.name)
        else:
            namespace[f"_{f.name}"] = constants.get(f.name, defaults.get(f.name))
            values.append(f"_{f.name}")
    exec(f"def build({', '.join(names)}):\n    return _new(_cls, ({', '.join(values)},))\n",
         namespace)
    return namespace["build"]


def causal_band(causal: bool, window: Tuple[int, int]):
    """(causal, (left, right)) as the problem's (is_causal, window_left, window_right): causal
    means right = 0, and right = 0 is spelled is_causal (which every kernel serves)."""
    left, right = window
    if causal:
        right = 0
    if right == 0:
        return True, left, -1
    return False, left, right


def empty_grad(like: Tensor) -> Tensor:
    """The placeholder a backward returns for a gradient nobody asked for."""
    return like.new_empty(0)


def mask_grad_shape(mask: Tensor) -> Tuple[int, ...]:
    """The shape a float attn_mask's gradient is accumulated at: the mask's, with 1 on every dim
    it is broadcast along (stride 0: an expand()ed view of a smaller mask)."""
    return tuple(1 if stride == 0 else size for size, stride in zip(mask.shape, mask.stride()))


# autograd nodes that pass a gradient on element for element (reshapes) or sum it over copies
# (expand): a chain of them from the mask up to an expand() of a tensor holding one element per
# distinct element of the mask means every copy's share is summed before anything reads it
_RESHAPES = frozenset(("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"))
_EXPAND = "ExpandBackward0"


def _copies_summed_by_autograd(mask: Tensor) -> bool:
    compact = math.prod(mask_grad_shape(mask))
    node = mask.grad_fn
    while node is not None and (node.name() in _RESHAPES or node.name() == _EXPAND):
        if node.name() == _EXPAND and math.prod(node._saved_self_sym_sizes) == compact:
            return True
        node = node.next_functions[0][0]
    return False


def with_dense_grad_mask(problem: "AttentionProblem") -> "AttentionProblem":
    """The problem, its float attn_mask copied dense when it is a broadcast (stride-0) view
    whose gradient autograd would not sum over the copies: the backward's compact dmask
    (mask_grad_shape) reaches the mask as a stride-0 view of equal shares
    (ops.mask_grad_for_input), which only the expand() that made the copies turns into the right
    gradient. A leaf (an expand()ed tensor detached and requiring grad), a mask that retains its
    grad, or one made some other way needs every element of its gradient: it gets them from a
    dense copy. (Under torch.compile the mask is taken as the public API makes it: expanded.)"""
    mask = problem.attn_mask
    if (mask is None or not mask.requires_grad or torch.compiler.is_compiling()
            or mask_grad_shape(mask) == tuple(mask.shape)
            or (not mask.retains_grad and _copies_summed_by_autograd(mask))):
        return problem
    return problem._replace(attn_mask=mask.contiguous())


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_shape(q: Tensor, num_streams: int, normalize: str) -> Tuple[int, ...]:
    batch, heads, q_total = q.shape[:3]
    if normalize == PEER:
        return (batch, heads, num_streams, q_total)
    return (batch, heads, q_total)


# The dropout keep mask of a call, kept on its seed tensor (which autograd saves for the backward)
# from the forward's draw to the backward: a backward that drew it again would run a random
# operation, which vmap refuses (gradcheck's batched-gradient check vmaps the backward).
_KEEP_MASK_ATTR = "_peer_attention_keep_mask"


def _keep_mask_key(problem: AttentionProblem):
    q = problem.q
    return (q.shape[0], q.shape[1], q.shape[2], problem.k.shape[2]), problem.dropout_p, q.device


def remember_keep_mask(problem: AttentionProblem, keep: Tensor) -> Tensor:
    """Keep `keep` (the forward's bool keep mask) with the problem's seed for its backward."""
    setattr(problem.dropout_seed, _KEEP_MASK_ATTR, (_keep_mask_key(problem), keep))
    return keep


def remembered_keep_mask(problem: AttentionProblem) -> Optional[Tensor]:
    """The keep mask the forward of this problem drew, or None (a seed no forward has used, or
    one reused for another shape or rate: the caller draws it again from the seed)."""
    saved = getattr(problem.dropout_seed, _KEEP_MASK_ATTR, None)
    if saved is None or saved[0] != _keep_mask_key(problem):
        return None
    return saved[1]
