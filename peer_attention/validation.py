"""Argument checks of the public API (SPEC section 4), done once, before any kernel runs.

Every message names the argument and says what was expected and what was given. Nothing here
modifies or copies a tensor; the only device sync is the range check of `kv_lengths`.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .problem import NORMALIZE_MODES, PEER

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_text(t: Tensor) -> str:
    return f"({', '.join(str(d) for d in t.shape)})"


def dims_text(shape) -> str:
    return f"({', '.join(str(d) for d in shape)})"


def check_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def check_same(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """Same dtype and device as the reference tensor."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def check_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def check_broadcastable(name: str, t: Tensor, target: Tuple[int, ...], target_text: str) -> None:
    if t.shape == target:  # the common full-shape case, without the per-dim walk
        return
    if t.dim() > len(target) or any(
        have != want and have != 1 for have, want in zip(reversed(t.shape), reversed(target))
    ):
        raise ValueError(
            f"{name}: expected a shape broadcastable to {target_text} = {dims_text(target)}, "
            f"got {shape_text(t)}"
        )


def check_gqa_heads(num_q_heads: int, num_kv_heads: int, enable_gqa: bool, where: str) -> None:
    if num_q_heads == num_kv_heads:
        return
    if not enable_gqa:
        raise ValueError(
            f"{where}: query has {num_q_heads} heads but key/value have {num_kv_heads}; "
            "pass enable_gqa=True for grouped-query attention"
        )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"{where}: with enable_gqa the query heads Hq={num_q_heads} must be a multiple of "
            f"the key/value heads H={num_kv_heads}"
        )


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

class DropoutRangeError(ValueError, RuntimeError):
    """dropout_p outside [0, 1] or NaN: a ValueError naming the argument (this package's rule for
    bad input) that is also the RuntimeError torch's SDPA raises for it."""


class ZeroHeadsError(ValueError):
    """Zero key/value heads for some query heads (GQA): rejected here and never handed to torch
    (patch_torch raises it instead of falling through), whose kernels divide by the head count."""


def _dropout_number(dropout_p, expected: str, allow_tensor: bool) -> float:
    """dropout_p as a float; TypeError for what is not a real number (torch's SDPA also takes a
    bool and a 0-dim tensor that does not require grad: `allow_tensor`)."""
    if allow_tensor and isinstance(dropout_p, Tensor):
        if dropout_p.dim() == 0 and not dropout_p.requires_grad and not dropout_p.is_complex():
            return float(dropout_p)
    elif isinstance(dropout_p, numbers.Real) and (allow_tensor or not isinstance(dropout_p, bool)):
        return float(dropout_p)
    raise TypeError(f"dropout_p: expected a float in {expected}, got {type(dropout_p).__name__}")


def check_dropout(dropout_p) -> float:
    """flash-attn's rule: a probability in [0, 1)."""
    dropout_p = _dropout_number(dropout_p, "[0, 1)", allow_tensor=False)
    if not 0.0 <= dropout_p < 1.0:  # also rejects NaN
        raise DropoutRangeError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    return dropout_p


def check_sdpa_dropout(dropout_p) -> float:
    """torch's rule: a probability in [0, 1] (1 drops everything); negative or NaN raise, as
    torch's SDPA does."""
    if type(dropout_p) is float and dropout_p == 0.0:  # the common call: no ABC check
        return 0.0
    dropout_p = _dropout_number(dropout_p, "[0, 1]", allow_tensor=True)
    if not 0.0 <= dropout_p <= 1.0:  # also rejects NaN
        raise DropoutRangeError(f"dropout_p: expected a float in [0, 1], got {dropout_p}")
    return dropout_p


def _padded(shape, ndim: int) -> Tuple[int, ...]:
    return (1,) * (ndim - len(shape)) + tuple(shape)


def _broadcast(*shapes):
    """The broadcast of equally long shapes, or None when they do not broadcast."""
    out = []
    for sizes in zip(*shapes):
        sized = [n for n in sizes if n != 1]  # a 1 broadcasts to any size, 0 included
        size = sized[0] if sized else 1
        if any(n != size for n in sized):
            return None
        out.append(size)
    return tuple(out)


def sdpa_layout(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """How the inputs broadcast, as torch's math SDPA does (matmul broadcasting of every dim but
    the last two; with enable_gqa the key/value heads are repeated up to the query heads).

    Returns (lead, heads, out_ndim, broadcast): the broadcast leading dims (before heads), the
    output heads, the output's number of dims, and whether q, k, v need any broadcasting (False:
    same leading dims, and key/value heads equal, dividing the query heads under GQA or 1).
    Raises ValueError naming the argument that does not fit."""
    qs, ks, vs = query.shape, key.shape, value.shape
    if (len(qs) == len(ks) == len(vs) >= 3 and qs[-3] == ks[-3] == vs[-3]
            and qs[:-3] == ks[:-3] == vs[:-3]):  # the common case, nothing to broadcast
        return qs[:-3], qs[-3], len(qs), False
    out_ndim = max(query.dim(), key.dim(), value.dim())
    ndim = max(out_ndim, 3)
    qs, ks, vs = (_padded(t.shape, ndim) for t in (query, key, value))
    hq, hk, hv = qs[-3], ks[-3], vs[-3]
    if enable_gqa:
        for name, h in (("key", hk), ("value", hv)):
            if (h == 0 and hq != 0) or (h != 0 and hq % h != 0):
                error = ZeroHeadsError if h == 0 else ValueError
                raise error(
                    f"{name}: with enable_gqa the query heads Hq={hq} must be a multiple of the "
                    f"{name} heads H={h}")
        heads = hq
    else:
        heads = 0 if 0 in (hq, hk, hv) else max(hq, hk, hv)  # 1 broadcasts to any size, 0 too
        for name, h in (("query", hq), ("key", hk), ("value", hv)):
            if h != heads and h != 1:
                raise ValueError(
                    f"{name}: has {h} heads where query/key/value have {hq}/{hk}/{hv}: heads must "
                    "be equal or 1; pass enable_gqa=True for grouped-query attention")
    lead = qs[:-3]
    if not ks[:-3] == vs[:-3] == lead:  # torch.broadcast_shapes costs ~30 us: only when needed
        lead = _broadcast(qs[:-3], ks[:-3], vs[:-3])
    if lead is None:
        raise ValueError(
            f"key, value: expected leading dims broadcastable with query's {dims_text(qs[:-3])}, got "
            f"key {shape_text(key)} and value {shape_text(value)}")
    plain = (query.dim() == key.dim() == value.dim() == ndim
             and qs[:-3] == ks[:-3] == vs[:-3] == lead
             and hk == hv and hq == heads and (heads % hk == 0 if hk else heads == 0))
    return lead, heads, out_ndim, not plain


def check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Returns (dropout_p, scale, layout) with layout = sdpa_layout(...); raises on any bad
    argument. `attn_mask` here is a plain tensor (a CausalBias is resolved before)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.is_nested:
            check_tensor(name, t)
            raise TypeError(
                f"{name}: nested (jagged) tensors are not served by peer_attention; call "
                "torch.nn.functional.scaled_dot_product_attention (patch_torch() hands them to it)")
    dtype = query.dtype
    if dtype not in SUPPORTED_DTYPES:  # (the call only for the error: a call costs ~0.1 us)
        check_float_dtype("query", query)
    if not (key.dtype is dtype and value.dtype is dtype and key.device == query.device
            and value.device == query.device):
        check_same("key", key, "query", query)
        check_same("value", value, "query", query)
    if is_causal is not True and is_causal is not False:
        check_bool("is_causal", is_causal)
    if enable_gqa is not True and enable_gqa is not False:
        check_bool("enable_gqa", enable_gqa)
    dropout_p = check_sdpa_dropout(dropout_p)

    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() < 2:
                raise ValueError(f"{name}: expected at least 2 dims (..., L, E), got {shape_text(t)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"key: expected last dim E={query.shape[-1]} as query, got {shape_text(key)}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"value: expected (..., S={key.shape[-2]}, Ev) as key, got {shape_text(value)}"
        )
    layout = sdpa_layout(query, key, value, enable_gqa)

    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask)
        # torch accepts bool, float32 ("float") or the query's dtype
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(
                f"attn_mask: expected dtype torch.bool, torch.float32 or {query.dtype} (as query), "
                f"got {attn_mask.dtype}"
            )
        check_device("attn_mask", attn_mask, "query", query)
        lead, heads, out_ndim, _ = layout
        target = (lead + (heads, query.shape[-2], key.shape[-2]))[-out_ndim:] if out_ndim >= 3 \
            else (query.shape[-2], key.shape[-2])
        check_broadcastable("attn_mask", attn_mask, target, "(N, ..., Hq, L, S)")
        if is_causal:
            raise ValueError("attn_mask: must be None when is_causal=True (as in torch)")
    return dropout_p, check_scale(scale, query.shape[-1]), layout


# ---------------------------------------------------------------------------------------------
# peer_attention
# ---------------------------------------------------------------------------------------------

def _check_streams(name: str, seq) -> Sequence[Tensor]:
    """The streams as a list or tuple of tensors (never modified: only read)."""
    if type(seq) is not list and type(seq) is not tuple:  # fast path first: ABC checks are slow
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name}: expected a list or tuple of tensors (one per stream), got "
                            f"{type(seq).__name__}")
        seq = list(seq)
    for t in seq:
        if not isinstance(t, Tensor):  # the argument's name is formatted only for the error
            for i, t in enumerate(seq):
                check_tensor(f"{name}[{i}]", t)
    return seq


def _fast_peers(peers, num_streams: int):
    """The table of the common call (S lists of S bools) as S*S ints, else None (checked below)."""
    if type(peers) is not list and type(peers) is not tuple or len(peers) != num_streams:
        return None
    flat = []
    for row in peers:
        if type(row) is not list and type(row) is not tuple or len(row) != num_streams:
            return None
        flat += row
    for entry in flat:
        if entry is not True and entry is not False:
            return None
    return tuple(map(int, flat))


def check_peers(peers, num_streams: int) -> Tuple[int, ...]:
    """The peer table as S*S ints (row-major)."""
    if peers is None:
        return (1,) * (num_streams * num_streams)
    flat = _fast_peers(peers, num_streams)
    if flat is not None:
        return flat
    expected = f"{num_streams}x{num_streams} (one row per stream)"
    if isinstance(peers, Tensor):
        if peers.dtype != torch.bool:
            raise TypeError(f"peers: expected a bool tensor, got dtype {peers.dtype}")
        if tuple(peers.shape) != (num_streams, num_streams):
            raise ValueError(f"peers: expected shape {expected}, got {shape_text(peers)}")
        return tuple(int(x) for x in peers.flatten().tolist())
    if not isinstance(peers, Sequence) or len(peers) != num_streams:
        got = len(peers) if isinstance(peers, Sequence) else type(peers).__name__
        raise ValueError(f"peers: expected {expected}, got {got} rows")
    flat = []
    for s, row in enumerate(peers):
        if not isinstance(row, Sequence) or len(row) != num_streams:
            got = len(row) if isinstance(row, Sequence) else type(row).__name__
            raise ValueError(f"peers[{s}]: expected {num_streams} entries, got {got}")
        for p, entry in enumerate(row):
            if not isinstance(entry, (bool, int)) or entry not in (0, 1):
                raise TypeError(f"peers[{s}][{p}]: expected a bool, got {entry!r}")
            flat.append(int(entry))
    return tuple(flat)


def _stream_shape_error(s: int, qs, ks, vs, batch, num_q_heads, num_kv_heads, head_dim,
                        value_dim):
    """Raise the error of stream s, whose shapes do not fit stream 0's."""
    if len(qs) != 4 or qs[0] != batch or qs[1] != num_q_heads or qs[3] != head_dim:
        raise ValueError(f"queries[{s}]: expected (B={batch}, Hq={num_q_heads}, L, E={head_dim}), "
                         f"got {dims_text(qs)}")
    if len(ks) != 4 or ks[0] != batch or ks[1] != num_kv_heads or ks[3] != head_dim:
        raise ValueError(f"keys[{s}]: expected (B={batch}, H={num_kv_heads}, M, E={head_dim}), "
                         f"got {dims_text(ks)}")
    raise ValueError(f"values[{s}]: expected (B={batch}, H={num_kv_heads}, M={ks[2]}, "
                     f"Ev={value_dim}), got {dims_text(vs)}")


def _check_weight(name: str, t, ref: Tensor, shape: Tuple[int, ...], shape_text: str) -> None:
    """gate / bias: a floating-point tensor on the queries' device, broadcastable to `shape`."""
    if type(t) is Tensor and t.shape == shape and t.is_floating_point() and t.device == ref.device:
        return  # the common call, in one line
    check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    check_device(name, t, "queries[0]", ref)
    check_broadcastable(name, t, shape, shape_text)


def check_peer(queries, keys, values, peers, gate, bias, normalize, is_causal, kv_lengths, scale,
               enable_gqa):
    """Returns (queries, keys, values, peers_flat, scale, (batch, num_q_heads, value_dim, q_lens,
    kv_lens)); raises on any bad argument."""
    queries = _check_streams("queries", queries)
    keys = _check_streams("keys", keys)
    values = _check_streams("values", values)
    num_streams = len(queries)
    if num_streams == 0:
        raise ValueError("queries: expected at least one stream, got an empty sequence")
    if len(keys) != num_streams or len(values) != num_streams:
        raise ValueError(
            f"keys, values: expected {num_streams} streams as queries, "
            f"got {len(keys)} keys and {len(values)} values"
        )
    # the checks' calls only for the errors: on this path each call counts (issue 9: <= 20 us)
    if is_causal is not True and is_causal is not False:
        check_bool("is_causal", is_causal)
    if enable_gqa is not True and enable_gqa is not False:
        check_bool("enable_gqa", enable_gqa)
    if not isinstance(normalize, str) or normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize: expected 'joint' or 'peer', got {normalize!r}")

    q0 = queries[0]
    if q0.dtype not in SUPPORTED_DTYPES:
        check_float_dtype("queries[0]", q0)
    if q0.dim() != 4:
        raise ValueError(f"queries[0]: expected 4 dims (B, Hq, L, E), got {shape_text(q0)}")
    batch, num_q_heads, _, head_dim = q0.shape
    k0 = keys[0]
    if k0.dim() != 4:
        raise ValueError(f"keys[0]: expected 4 dims (B, H, M, E), got {shape_text(k0)}")
    num_kv_heads = k0.shape[1]
    v0 = values[0]
    if v0.dim() != 4:
        raise ValueError(f"values[0]: expected 4 dims (B, H, M, Ev), got {shape_text(v0)}")
    value_dim = v0.shape[3]
    dtype, device = q0.dtype, q0.device
    q_shape, k_shape = (batch, num_q_heads, head_dim), (batch, num_kv_heads, head_dim)
    q_lens, kv_lens = [], []
    for s in range(num_streams):
        q, k, v = queries[s], keys[s], values[s]
        # one cheap comparison per call; the per-tensor checks only to word the error
        if not (q.dtype is dtype and k.dtype is dtype and v.dtype is dtype
                and q.device == device and k.device == device and v.device == device):
            check_same(f"queries[{s}]", q, "queries[0]", q0)
            check_same(f"keys[{s}]", k, "queries[0]", q0)
            check_same(f"values[{s}]", v, "queries[0]", q0)
        qs, ks, vs = q.shape, k.shape, v.shape
        if not (len(qs) == 4 and len(ks) == 4 and len(vs) == 4
                and (qs[0], qs[1], qs[3]) == q_shape and (ks[0], ks[1], ks[3]) == k_shape
                and (vs[0], vs[1], vs[2], vs[3]) == (batch, num_kv_heads, ks[2], value_dim)):
            _stream_shape_error(s, qs, ks, vs, batch, num_q_heads, num_kv_heads, head_dim, value_dim)
        q_lens.append(qs[2])
        kv_lens.append(ks[2])
    if head_dim == 0:
        raise ValueError(f"queries[0]: expected head dim E >= 1, got {shape_text(q0)}")
    if num_q_heads != num_kv_heads:
        check_gqa_heads(num_q_heads, num_kv_heads, enable_gqa, "keys")

    peers_flat = check_peers(peers, num_streams)
    if gate is not None:
        _check_weight("gate", gate, q0, (batch, num_streams, num_streams, num_q_heads, value_dim),
                      "(B, S, S, Hq, Ev)")
    if bias is not None:
        if normalize == PEER:
            check_tensor("bias", bias)
            raise ValueError(
                "bias: not accepted with normalize='peer' (a per-peer constant cancels in a "
                "per-peer softmax); use normalize='joint'"
            )
        _check_weight("bias", bias, q0, (batch, num_streams, num_streams, num_q_heads),
                      "(B, S, S, Hq)")
    if kv_lengths is not None:
        check_kv_lengths(kv_lengths, batch, kv_lens, q0)
    shapes = (batch, num_q_heads, value_dim, tuple(q_lens), tuple(kv_lens))
    return queries, keys, values, peers_flat, check_scale(scale, head_dim), shapes


def check_kv_lengths(kv_lengths, batch: int, kv_lens: Sequence[int], ref: Tensor) -> None:
    check_tensor("kv_lengths", kv_lengths)
    num_streams = len(kv_lens)
    if kv_lengths.dtype.is_floating_point or kv_lengths.dtype.is_complex or kv_lengths.dtype == torch.bool:
        raise TypeError(f"kv_lengths: expected an integer dtype, got {kv_lengths.dtype}")
    if tuple(kv_lengths.shape) != (batch, num_streams):
        raise ValueError(f"kv_lengths: expected shape (B, S) = ({batch}, {num_streams}), got {shape_text(kv_lengths)}")
    if kv_lengths.device != ref.device and kv_lengths.device.type != "cpu":
        raise ValueError(
            f"kv_lengths: expected device {ref.device} (as queries[0]) or cpu, got {kv_lengths.device}"
        )
    if torch.compiler.is_compiling() or kv_lengths.numel() == 0:
        return  # the range check needs the values on the host
    limits = torch.tensor(list(kv_lens), device=kv_lengths.device)
    bad = (kv_lengths < 0) | (kv_lengths > limits)
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"kv_lengths: expected 0 <= kv_lengths[b, p] <= M_p (key length of stream p), "
            f"got kv_lengths[{b}, {p}] = {int(kv_lengths[b, p])} with M_{p} = {kv_lens[p]}"
        )


# ---------------------------------------------------------------------------------------------
# variants (SPEC section 9): shared by flash_attn_func, flash_attn_varlen_func and peer_attention
# ---------------------------------------------------------------------------------------------

def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def check_window(name: str, window) -> Tuple[int, int]:
    """(left, right), two ints >= -1 (-1 = unbounded on that side)."""
    if isinstance(window, Tensor) or not isinstance(window, Sequence) or len(window) != 2:
        got = len(window) if isinstance(window, Sequence) and not isinstance(window, str) \
            else type(window).__name__
        raise TypeError(f"{name}: expected (left, right), two ints >= -1, got {got!r}")
    left = check_int(f"{name}[0]", window[0], -1)
    right = check_int(f"{name}[1]", window[1], -1)
    return left, right


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float >= 0, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):  # also rejects NaN
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap}")
    return softcap


def check_sinks(sinks, num_q_heads: int, ref: Tensor, ref_name: str) -> Optional[Tensor]:
    """One logit per query head, (Hq,), floating point, on ref's device."""
    if sinks is None:
        return None
    check_tensor("sinks", sinks)
    if not sinks.is_floating_point():
        raise TypeError(f"sinks: expected a floating-point dtype, got {sinks.dtype}")
    if tuple(sinks.shape) != (num_q_heads,):
        raise ValueError(f"sinks: expected shape (Hq,) = ({num_q_heads},), got {shape_text(sinks)}")
    check_device("sinks", sinks, ref_name, ref)
    return sinks


def check_alibi_slopes(alibi_slopes, batch: int, num_q_heads: int, ref: Tensor,
                       ref_name: str) -> Optional[Tensor]:
    """float32 (Hq,) or (B, Hq); returns the (B, Hq) view (no copy)."""
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes: expected dtype torch.float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((num_q_heads,), (batch, num_q_heads)):
        raise ValueError(
            f"alibi_slopes: expected shape (Hq,) = ({num_q_heads},) or (B, Hq) = "
            f"({batch}, {num_q_heads}), got {shape_text(alibi_slopes)}"
        )
    check_device("alibi_slopes", alibi_slopes, ref_name, ref)
    return alibi_slopes.expand(batch, num_q_heads)


def _check_flash_common(q, k, v, dims: int, layout: str, kv_layout: str, v_layout: str):
    check_tensor("q", q)
    check_tensor("k", k)
    check_tensor("v", v)
    check_float_dtype("q", q)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    for name, t, text in (("q", q, layout), ("k", k, kv_layout), ("v", v, v_layout)):
        if t.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dims {text}, got {shape_text(t)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head dim E={q.shape[-1]} as q, got {shape_text(k)}")
    if q.shape[-1] == 0:
        raise ValueError(f"q: expected head dim E >= 1, got {shape_text(q)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: expected {dims_text(tuple(k.shape[:-1]) + ('Ev',))} as k, got {shape_text(v)}")
    num_q_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    if num_kv_heads == 0 and num_q_heads == 0:
        return  # no heads at all: an empty result
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"k: the query heads Hq={num_q_heads} must be a multiple of the key/value heads "
            f"H={num_kv_heads} (q {shape_text(q)}, k {shape_text(k)})"
        )


def check_flash_options(q, batch, dropout_p, softmax_scale, causal, window_size, softcap,
                        alibi_slopes, deterministic, return_attn_probs, sinks):
    """The options shared by flash_attn_func and flash_attn_varlen_func.
    Returns (dropout_p, scale, (left, right), softcap, alibi_slopes (B, Hq) view or None)."""
    dropout_p = check_dropout(dropout_p)
    try:  # the same rule as `scale`, under flash-attn's name for it
        scale = check_scale(softmax_scale, q.shape[-1])
    except (TypeError, ValueError) as err:
        raise type(err)("softmax_" + str(err)) from None
    check_bool("causal", causal)
    check_bool("deterministic", deterministic)
    check_bool("return_attn_probs", return_attn_probs)
    window = check_window("window_size", window_size)
    softcap = check_softcap(softcap)
    num_q_heads = q.shape[-2]
    slopes = check_alibi_slopes(alibi_slopes, batch, num_q_heads, q, "q")
    check_sinks(sinks, num_q_heads, q, "q")
    if sinks is not None and dropout_p > 0:
        raise ValueError(f"dropout_p: must be 0 with sinks (dropout of a sink row is not "
                         f"supported), got {dropout_p}")
    return dropout_p, scale, window, softcap, slopes


def check_flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                     alibi_slopes, deterministic, return_attn_probs, sinks):
    """flash_attn_func: q (B, L, Hq, E), k (B, S, H, E), v (B, S, H, Ev).
    Returns (dropout_p, scale, window, softcap, alibi_slopes (B, Hq) view or None)."""
    _check_flash_common(q, k, v, 4, "(B, L, Hq, E)", "(B, S, H, E)", "(B, S, H, Ev)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch B={q.shape[0]} as q, got {shape_text(k)}")
    return check_flash_options(q, q.shape[0], dropout_p, softmax_scale, causal, window_size,
                               softcap, alibi_slopes, deterministic, return_attn_probs, sinks)


def check_cu_seqlens(name: str, cu_seqlens, total: int, total_name: str) -> List[int]:
    """int32 (batch + 1,) prefix sums starting at 0, non-decreasing, ending at `total`.
    Returns the per-sequence lengths (one host sync)."""
    check_tensor(name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (batch + 1,), got {shape_text(cu_seqlens)}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] = 0, got {offsets[0]}")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"{name}: expected non-decreasing offsets, got {name}[{i + 1}] = "
                             f"{offsets[i + 1]} < {name}[{i}] = {offsets[i]}")
    if offsets[-1] != total:
        raise ValueError(f"{name}: expected the last offset to be {total_name} = {total}, "
                         f"got {offsets[-1]}")
    return lengths


def check_flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            deterministic, return_attn_probs, sinks):
    """flash_attn_varlen_func: q (total_q, Hq, E), k (total_k, H, E), v (total_k, H, Ev).
    Returns (q_lens, kv_lens, dropout_p, scale, window, softcap, alibi_slopes (1, Hq) or None)."""
    _check_flash_common(q, k, v, 3, "(total_q, Hq, E)", "(total_k, H, E)", "(total_k, H, Ev)")
    q_lens = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "total_q")
    kv_lens = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "total_k")
    if len(q_lens) != len(kv_lens):
        raise ValueError(f"cu_seqlens_k: expected {len(q_lens) + 1} offsets (batch + 1) as "
                         f"cu_seqlens_q, got {len(kv_lens) + 1}")
    for name, value, lens in (("max_seqlen_q", max_seqlen_q, q_lens),
                              ("max_seqlen_k", max_seqlen_k, kv_lens)):
        check_int(name, value, 0)
        if lens and value < max(lens):
            raise ValueError(f"{name}: expected at least the longest sequence, {max(lens)}, "
                             f"got {value}")
    batch = len(q_lens)
    dropout_p, scale, window, softcap, slopes = check_flash_options(
        q, batch, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs, sinks)
    if dropout_p > 0:
        raise ValueError(f"dropout_p: must be 0 in flash_attn_varlen_func (dropout is served "
                         f"for one sequence only; use flash_attn_func), got {dropout_p}")
    if slopes is not None:
        # the sequences are streams of one batch entry: one slope row serves them all
        if batch > 1 and alibi_slopes.dim() == 2 and not bool((alibi_slopes == alibi_slopes[:1]).all()):
            raise ValueError("alibi_slopes: per-sequence slopes (different rows of (batch, Hq)) "
                             "are not supported by flash_attn_varlen_func; pass (Hq,) slopes")
        slopes = slopes[:1]
    return q_lens, kv_lens, dropout_p, scale, window, softcap, slopes


def check_peer_variants(softcap, window, sinks, normalize: str, num_q_heads: int, ref: Tensor):
    """peer_attention's SPEC section 9 options. Returns (softcap, (left, right), sinks).
    (api._peer_problem skips the call for the common call: no window, no sinks, softcap 0.0.)"""
    softcap = check_softcap(softcap)
    window = (-1, -1) if window is None else check_window("window", window)
    if sinks is not None:
        if normalize != "joint":
            raise ValueError(f"sinks: only with normalize='joint' (a sink joins the one joint "
                             f"softmax), got normalize={normalize!r}")
        check_sinks(sinks, num_q_heads, ref, "queries[0]")
    return softcap, window, sinks


def check_problem_variants(problem):
    """The variant fields (SPEC section 9, problem.VARIANTS) of a normalised problem that an upper
    layer built or changed (`problem._replace(softcap=...)`), checked as the public functions
    check them; returns the problem, its softcap as a float and its ALiBi slopes as (B, Hq).
    (entry.run calls it; a problem with every variant at its default costs one test.)"""
    if not problem.has_variants:
        return problem
    q = problem.q
    check_int("window_left", problem.window_left, -1)
    check_int("window_right", problem.window_right, -1)
    check_bool("bottom_right", problem.bottom_right)
    softcap = check_softcap(problem.softcap)
    slopes = check_alibi_slopes(problem.alibi_slopes, q.shape[0], q.shape[1], q, "q")
    if problem.sinks is not None:
        if problem.normalize != "joint":
            raise ValueError(f"sinks: only with normalize='joint' (a sink joins the one joint "
                             f"softmax), got normalize={problem.normalize!r}")
        check_sinks(problem.sinks, q.shape[1], q, "q")
        if problem.dropout_p > 0:
            raise ValueError("dropout_p: must be 0 with attention sinks")
    if softcap is not problem.softcap or slopes is not problem.alibi_slopes:
        problem = problem._replace(softcap=softcap, alibi_slopes=slopes)
    return problem
