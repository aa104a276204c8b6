"""The public functions: validate, normalise the layout, dispatch, restore the caller's layout."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import sys

import torch
from torch import Tensor

from . import dispatch
from .dispatch import functorch_active, jit_tracing, transforms_active
from .double_backward import recompute_output
from .problem import JOINT, AttentionProblem, causal_band, problem_builder
from .reference import LOW_PRECISION
from .stream_packing import packed, unpacked
from .validation import check_peer, check_peer_variants, check_sdpa


def _as_4d(t: Tensor, lead_numel: int) -> Tensor:
    """(N, ..., H, L, E) -> (B, H, L, E) without a copy when the strides allow."""
    if t.dim() == 4:
        return t
    return t.reshape(lead_numel, t.shape[-3], t.shape[-2], t.shape[-1])


def broadcast_in_fp32(t: Tensor, shape) -> Tensor:
    """t expanded to `shape`. A 16-bit t that requires grad and is broadcast is first cast to
    float32 (a copy of the small tensor only): the backward's sum over the broadcast dims then runs
    in float32 and is rounded once, not term by term."""
    if t.shape == shape:  # nothing to broadcast: no view to make either
        return t
    if t.requires_grad and t.dtype in LOW_PRECISION:
        t = t.float()
    return t.expand(shape)


_CAUSAL_BIAS_MODULE = "torch.nn.attention.bias"


def is_causal_bias(attn_mask) -> bool:
    """Whether attn_mask is torch's CausalBias. Its module is looked up, never imported: a
    CausalBias can only exist once that module is loaded, and importing it pulls in torch._dynamo
    (about a second at start-up, and an abort at exit in gloo worker processes)."""
    module = sys.modules.get(_CAUSAL_BIAS_MODULE)
    return module is not None and isinstance(attn_mask, module.CausalBias)


def resolve_causal_bias(attn_mask, is_causal):
    """torch's CausalBias masks (torch.nn.attention.bias) as flags: (attn_mask, is_causal,
    bottom_right). Upper-left is is_causal; lower-right is is_causal aligned bottom-right (query i
    sees key j iff j <= i + S - L). Their storage is never read."""
    if not is_causal_bias(attn_mask):
        return attn_mask, is_causal, False
    CausalVariant = sys.modules[_CAUSAL_BIAS_MODULE].CausalVariant
    if is_causal:
        raise ValueError("attn_mask: a CausalBias must not be used with is_causal=True (as in torch)")
    if attn_mask.variant == CausalVariant.UPPER_LEFT or attn_mask.seq_len_q == attn_mask.seq_len_kv:
        return None, True, False  # torch's own rule: square biases are plain is_causal
    if attn_mask.variant != CausalVariant.LOWER_RIGHT:
        raise ValueError(f"attn_mask: unknown CausalBias variant {attn_mask.variant!r}")
    return None, True, True


def _autocast(query, key, value, attn_mask):
    """Under torch.autocast, the cast torch's SDPA does first: every floating input except
    float64 to the autocast dtype of the query's device type (mixed dtypes then agree)."""
    if not torch._C._is_any_autocast_enabled() or not isinstance(query, Tensor):
        return query, key, value, attn_mask
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value, attn_mask
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(query), cast(key), cast(value), cast(attn_mask)


def _broadcast_qkv(query, key, value, layout, enable_gqa):
    """q, k, v as (lead..., Hq, L, E), (lead..., H, S, E), (lead..., H, S, Ev) with H dividing Hq:
    torch's broadcasting of leading dims and heads, as views where possible."""
    lead, heads = tuple(layout[0]), layout[1]
    ndim = len(lead) + 3
    q, k, v = (t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    hk, hv = k.shape[-3], v.shape[-3]
    if hk == hv and (heads % hk == 0 if hk else heads == 0):
        kv_heads = hk  # equal heads, a single head (broadcast) or GQA groups: served as they are
    else:  # key and value differ in heads: repeat each up to the query heads (GQA's mapping)
        k = k.repeat_interleave(heads // hk, dim=-3) if hk not in (1, heads) else k
        v = v.repeat_interleave(heads // hv, dim=-3) if hv not in (1, heads) else v
        kv_heads = heads
    q = q.expand(lead + (heads,) + tuple(q.shape[-2:]))
    k = k.expand(lead + (kv_heads,) + tuple(k.shape[-2:]))
    v = v.expand(lead + (kv_heads,) + tuple(v.shape[-2:]))
    return q, k, v


# the problems of the two public operations, built on every call (problem_builder: the fields named)
_sdpa_problem = problem_builder(
    "q", "k", "v", "q_lens", "kv_lens", "attn_mask", "dropout_seed", "dropout_p", "is_causal",
    "scale", "bottom_right", peers=(1,), gate=None, bias=None, kv_lengths=None, normalize=JOINT)
_peer_problem_of = problem_builder(
    "q", "k", "v", "q_lens", "kv_lens", "peers", "gate", "bias", "kv_lengths", "is_causal",
    "scale", "normalize", "window_left", "window_right", "softcap", "sinks", attn_mask=None,
    dropout_seed=None, dropout_p=0.0)


class SdpaCall(NamedTuple):
    problem: AttentionProblem
    out_shape: Tuple[int, ...]
    drop_all: bool  # dropout_p == 1: torch's result is all zeros (with zero gradients)


def prepare_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False) -> SdpaCall:
    """Validate an SDPA call and express it as the one-stream normalised problem."""
    attn_mask, is_causal, bottom_right = resolve_causal_bias(attn_mask, is_causal)
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    dropout_p, scale, layout = check_sdpa(query, key, value, attn_mask, dropout_p, is_causal,
                                          scale, enable_gqa)
    lead, heads, out_ndim, broadcast = layout
    if broadcast:
        out_shape = (tuple(lead) + (heads, query.shape[-2], value.shape[-1]))[-out_ndim:]
        query, key, value = _broadcast_qkv(query, key, value, layout, enable_gqa)
    else:
        out_shape = query.shape[:-1] + (value.shape[-1],)
    lead_numel = 1
    for n in lead:
        lead_numel *= n
    q = _as_4d(query, lead_numel)
    k = _as_4d(key, lead_numel)
    v = _as_4d(value, lead_numel)
    mask = None
    if attn_mask is not None:
        full = tuple(query.shape[:-1]) + (key.shape[-2],)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)  # a float32 mask with another query dtype
        mask = (broadcast_in_fp32(attn_mask, full) if attn_mask.dtype != torch.bool
                else attn_mask.expand(full))
        if len(full) != 4:  # merging expanded leading dims copies only when strides forbid a view
            mask = mask.reshape(lead_numel, *full[-3:])
    drop_all = dropout_p >= 1.0
    seed = None
    if drop_all:
        dropout_p = 0.0
    elif dropout_p > 0:
        dropout_p, seed = dispatch.dropout_draw(dropout_p, q, k)
    problem = _sdpa_problem(q, k, v, (q.shape[2],), (k.shape[2],), mask, seed, dropout_p,
                            is_causal, scale, bottom_right)
    return SdpaCall(problem, tuple(out_shape), drop_all)


def sdpa_problem(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False) -> AttentionProblem:
    """The normalised problem of an SDPA call (see prepare_sdpa)."""
    return prepare_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                        enable_gqa).problem


def run_under_transform(problem: AttentionProblem, backend: Optional[str], function: str) -> Tensor:
    """A call made while a torch.func transform or torch.jit.trace is active: the reference
    formulas as plain PyTorch ops, which every transform and the tracer handle."""
    name = dispatch.requested_backend(backend)
    if name not in (None, dispatch.ORACLE):  # the reference formulas serve it
        raise RuntimeError(
            f"peer_attention.{function}: backend {name!r} cannot run under a torch.func "
            "transform (grad, vmap, jacrev, ...) or torch.jit.trace; use backend='reference' "
            "there (or torch's own function)")
    if problem.dropout_p > 0:
        raise RuntimeError(
            f"peer_attention.{function}: dropout is not supported under a torch.func transform "
            "or torch.jit.trace; use torch.nn.functional.scaled_dot_product_attention there")
    return recompute_output(problem, None)


def run_sdpa(call: SdpaCall, backend: Optional[str] = None) -> Tensor:
    """Serve a prepared SDPA call; the output in the caller's layout."""
    if not torch.compiler.is_compiling() and transforms_active():
        out = run_under_transform(call.problem, backend, "scaled_dot_product_attention")
    else:
        out, _ = dispatch.output_and_backend(call.problem, backend)
    if call.drop_all:
        out = out * 0.0
    if out.shape == call.out_shape:  # (B, H, L, Ev) already: no view to make
        return out
    return out.view(call.out_shape)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (SPEC section 2).

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) ->
    (N, ..., Hq, L, Ev), broadcasting leading dims and heads as torch does. `attn_mask` may be
    torch's CausalBias (causal_upper_left / causal_lower_right). `backend`: None/"auto", "cuda",
    "triton", "torch" or "reference".
    """
    call = prepare_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return run_sdpa(call, backend)


def peer_problem(queries, keys, values, *, peers=None, gate=None, bias=None, normalize="joint",
                 is_causal=False, kv_lengths=None, scale=None, enable_gqa=False, softcap=0.0,
                 window=None, sinks=None) -> AttentionProblem:
    """Validate a peer_attention call and pack its streams into the normalised problem."""
    return _peer_problem(queries, keys, values, peers, gate, bias, normalize, is_causal,
                         kv_lengths, scale, enable_gqa, softcap, window, sinks)[0]


_SHAPES_KEPT = 64
_shape_placeholders: dict = {}  # (dtype, device, q, k, v shapes) -> placeholders, as _shape_only


def _shape_only(like: Tensor, q_shape, k_shape, v_shape):
    """Tensors of the packed q, k and v shapes with like's dtype and device and no storage of
    their own (stride-0 views of one element): the packed q, k, v as backend selection sees them.
    Kept per shape (a training loop repeats its shapes; an expand costs about 1.5 us)."""
    key = (like.dtype, like.device, q_shape, k_shape, v_shape)
    kept = _shape_placeholders.get(key)
    if kept is None:
        if len(_shape_placeholders) >= _SHAPES_KEPT:
            _shape_placeholders.clear()
        with torch.inference_mode(False):  # normal tensors, usable outside inference_mode too
            element = like.new_zeros(())
        kept = _shape_placeholders[key] = tuple(element.expand(shape)
                                                for shape in (q_shape, k_shape, v_shape))
    return kept


def _peer_problem(queries, keys, values, peers, gate, bias, normalize, is_causal, kv_lengths,
                  scale, enable_gqa, softcap, window, sinks, backend=None, unpacked_ok=False):
    """(problem, streams): streams is None and the problem's q, k, v are the packed streams; or,
    with unpacked_ok where dispatch.streams_may_serve, the caller's (queries, keys, values) and
    the problem's q, k, v shape placeholders (_shape_only), to be packed by _packed if the
    `torch` backend's stream plan does not take the call."""
    queries, keys, values, peers_flat, scale, shapes = check_peer(
        queries, keys, values, peers, gate, bias, normalize, is_causal, kv_lengths, scale,
        enable_gqa,
    )
    batch, num_q_heads, value_dim, q_lens, kv_lens = shapes
    q0 = queries[0]
    if window is None and sinks is None and type(softcap) is float and softcap == 0.0:
        window_left = window_right = -1  # the common call, no variant: no checks to run
    else:
        softcap, window, sinks = check_peer_variants(softcap, window, sinks, normalize,
                                                     num_q_heads, q0)
        is_causal, window_left, window_right = causal_band(is_causal, window)
    num_streams = len(queries)
    streams = None
    if num_streams == 1:
        q, k, v = q0, keys[0], values[0]
    elif unpacked_ok and dispatch.streams_may_serve(q0.device, backend):
        streams = (queries, keys, values)
        q_total, kv_total, kv_heads = sum(q_lens), sum(kv_lens), keys[0].shape[1]
        q, k, v = _shape_only(q0, (batch, num_q_heads, q_total, q0.shape[3]),
                              (batch, kv_heads, kv_total, q0.shape[3]),
                              (batch, kv_heads, kv_total, value_dim))
    else:  # one packed buffer per role; the caller's tensors are only read
        q = packed(queries, q_lens)
        k, v = packed(keys, kv_lens), packed(values, kv_lens)
    if gate is not None:
        gate = broadcast_in_fp32(gate, (batch, num_streams, num_streams, num_q_heads, value_dim))
    if bias is not None:
        bias = broadcast_in_fp32(bias, (batch, num_streams, num_streams, num_q_heads))
    if kv_lengths is not None and kv_lengths.device != q.device:
        kv_lengths = kv_lengths.to(q.device)
    problem = _peer_problem_of(q, k, v, q_lens, kv_lens, peers_flat, gate, bias, kv_lengths,
                               is_causal, scale, normalize, window_left, window_right, softcap,
                               sinks)
    return problem, streams


def _packed(problem: AttentionProblem, streams) -> AttentionProblem:
    """The problem with its shape placeholders replaced by the packed streams."""
    queries, keys, values = streams
    return problem._replace(q=packed(queries, problem.q_lens), k=packed(keys, problem.kv_lens),
                            v=packed(values, problem.kv_lens))


def peer_attention(queries: Sequence[Tensor], keys: Sequence[Tensor], values: Sequence[Tensor], *,
                   peers=None, gate: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   normalize: str = "joint", is_causal: bool = False,
                   kv_lengths: Optional[Tensor] = None, scale: Optional[float] = None,
                   enable_gqa: bool = False, backend: Optional[str] = None, softcap: float = 0.0,
                   window=None, sinks: Optional[Tensor] = None) -> List[Tensor]:
    """Multi-stream peer attention (SPEC section 3); returns S tensors (B, Hq, L_s, Ev).

    Variants (SPEC section 9): `softcap` > 0 caps every pair's scores, z = softcap *
    tanh(scale * q.k / softcap); `window=(left, right)` bands the self pairs, top-left aligned
    like is_causal (query i sees key j iff i - left <= j <= i + right, -1 = unbounded);
    `sinks` (Hq,), normalize="joint" only: a per-head logit in every row's softmax, no value."""
    problem, streams = _peer_problem(queries, keys, values, peers, gate, bias, normalize,
                                     is_causal, kv_lengths, scale, enable_gqa, softcap, window,
                                     sinks, backend, unpacked_ok=True)
    if streams is not None:  # plain eager mode, where the `torch` backend may take the streams
        if dispatch.caller_streams_serve(problem, backend, (*streams[0], *streams[1], *streams[2],
                                                            gate, bias, kv_lengths)):
            return dispatch.caller_streams_outputs(problem, *streams)
        problem = _packed(problem, streams)
    if not torch.compiler.is_compiling() and (functorch_active() or jit_tracing()):
        out = run_under_transform(problem, backend, "peer_attention")  # transforms_active()
    else:
        out, _ = dispatch.output_and_backend(problem, backend)
    return unpacked(out, problem.q_lens)
