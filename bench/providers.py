"""Providers: the ways of computing a case that the bench compares.

Each provider turns (case, inputs) into a zero-argument function returning the list of stream
outputs, or raises `Unavailable` / `Unsupported` with the reason (reported, never dropped):

  pa.cuda, pa.triton, pa.torch,      this package, through its public API with backend=NAME
  pa.reference
  pa.auto                            this package's own choice (what patch_torch() gives); only when named
  pa.torch.pairs, pa.torch.fused     the `torch` backend with one of its peer plans forced (a pair call
                                     per attended pair + merges, or a call per query stream over the
                                     concatenated keys); only when named (the cpu preset compares them)
  torch.flash/efficient/cudnn/math   torch SDPA with one backend forced (torch.nn.attention.sdpa_kernel)
  torch.sdpa                         torch SDPA with its own backend choice; only when named
  flex                               FlexAttention (torch.compile'd on CUDA, eager on CPU): a block
                                     mask for causal/padding/sparse peers, a score_mod for masks and
                                     bias; gates or per-peer softmax -> one flex call per pair + gated sum
  compose.pairs                      peer mode as a user writes it: SDPA per pair, then the gated sum
  compose.concat                     joint mode as a user writes it: SDPA over the concatenated keys of
                                     the attended peers with an additive mask, the gate folded into V
  compose.packed                     joint mode of streams that all attend all (no gate, bias or causal
                                     self pair) as an MMDiT block writes it: torch.cat of the streams'
                                     q/k/v, one SDPA (kv_lengths as a key mask), a split
  fa4                                FlashAttention-4 (flash_attn.cute), Hopper/Blackwell, when installed
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import peer_attention as pa
from peer_attention.backends.torch_fused import forced_plan

from .common import Built, Case, Inputs, Provider, Unavailable, Unsupported

# The package's backends, in its speed order, from its public listing: a new backend is a new
# pa.NAME provider here (and in the variants suite) without an edit.
PACKAGE_BACKENDS = tuple(pa.available_backends())
CUDA_ONLY_SDPA = ("efficient", "cudnn")


def _gqa(case: Case) -> bool:
    return case.q_heads != case.kv_heads


# ---- this package --------------------------------------------------------------------------

def _package(backend: str, plan: Optional[str] = None) -> Provider:
    """backend="auto": the package's own choice, as patch_torch() and a plain call make it; plan: the
    `torch` backend's peer plan forced ("pairs" or "fused"; a plan that cannot serve falls back)."""
    def build(case: Case, x: Inputs) -> Built:
        reason = pa.available_backends().get(backend)
        if reason:
            raise Unavailable(reason)
        if case.kind == "sdpa":
            def run():
                return [pa.scaled_dot_product_attention(
                    x.queries[0], x.keys[0], x.values[0], attn_mask=x.attn_mask, dropout_p=case.dropout_p,
                    is_causal=case.is_causal, enable_gqa=_gqa(case), backend=backend)]
        else:
            def run():
                return pa.peer_attention(
                    x.queries, x.keys, x.values, peers=case.peer_table(), gate=x.gate, bias=x.bias,
                    normalize=case.normalize, is_causal=case.is_causal, kv_lengths=x.kv_lengths,
                    enable_gqa=_gqa(case), backend=backend)
        if plan is None:
            return run, ""
        if case.kind != "peer":
            raise Unsupported("a peer plan: peer attention cases only")

        def run_forced():
            with forced_plan(plan):
                return run()
        return run_forced, f"{plan} plan forced"
    if plan is not None:
        return Provider(f"pa.{backend}.{plan}", True, ("peer",), build, default=False)
    return Provider(f"pa.{backend}", True, ("sdpa", "peer"), build,
                    materializes_scores=(backend == "reference"), default=(backend != "auto"))


# ---- torch SDPA with a forced backend ------------------------------------------------------

def _torch_sdpa(label: str, backend_attr: Optional[str]) -> Provider:
    """backend_attr None: torch's own choice of backend (torch.sdpa)."""
    def build(case: Case, x: Inputs) -> Built:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if label in CUDA_ONLY_SDPA and x.queries[0].device.type != "cuda":
            raise Unsupported(f"torch SDPA {label} runs on CUDA tensors only")

        def context():
            if backend_attr is None:
                return contextlib.nullcontext()
            return sdpa_kernel([getattr(SDPBackend, backend_attr)])

        def run():
            with context():
                return [F.scaled_dot_product_attention(
                    x.queries[0], x.keys[0], x.values[0], attn_mask=x.attn_mask, dropout_p=case.dropout_p,
                    is_causal=case.is_causal, enable_gqa=_gqa(case))]

        with warnings.catch_warnings(record=True) as caught:  # torch says why a backend refuses
            warnings.simplefilter("always")
            try:
                run()
            except RuntimeError as exc:
                if "No viable backend" not in str(exc) and "No available kernel" not in str(exc):
                    raise
                why = "; ".join(_torch_warning_text(w.message) for w in caught) or str(exc)
                raise Unsupported(f"torch SDPA {label} cannot run this case: {why}") from None
        return run, ""
    return Provider(f"torch.{label}", False, ("sdpa",), build, materializes_scores=(label == "math"),
                    default=backend_attr is not None)


def _torch_warning_text(message) -> str:
    """torch's refusal reason without its '(Triggered internally at file:line.)' tails."""
    text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(message))
    return " ".join(text.split())


# ---- plain-PyTorch compositions for peer attention -----------------------------------------

def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _allowed_mask(case: Case, x: Inputs, s: int, p: int) -> Optional[torch.Tensor]:
    """Bool (B, 1, L_s, M_p) of the keys query stream s may see in stream p, or None if all."""
    q_len, kv_len = case.q_lens[s], case.kv_lens[p]
    device = x.queries[0].device
    allowed = None
    if case.is_causal and s == p:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()[None, None]
    if x.kv_lengths is not None:
        keep = torch.arange(kv_len, device=device)[None, :] < x.kv_lengths[:, p, None]
        keep = keep[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def _build_pairs(case: Case, x: Inputs) -> Built:
    if case.kind != "peer" or case.normalize != "peer":
        raise Unsupported("a softmax per pair gives only normalize='peer' (torch SDPA returns no "
                          "log-sum-exp to merge pairs into the joint softmax)")
    table = case.peer_table()
    masks = {}
    for s, p in case.attended_pairs():
        allowed = _allowed_mask(case, x, s, p)
        only_causal = case.is_causal and s == p and x.kv_lengths is None
        masks[(s, p)] = (None, True) if only_causal else (allowed, False)

    def run():
        outs = []
        for s, q in enumerate(x.queries):
            out = q.new_zeros(q.shape[0], case.q_heads, q.shape[2], case.value_dim)
            for p in range(case.num_streams):
                if not table[s][p]:
                    continue
                mask, causal = masks[(s, p)]
                part = F.scaled_dot_product_attention(q, x.keys[p], x.values[p], attn_mask=mask,
                                                      is_causal=causal, enable_gqa=_gqa(case))
                out = out + (part if x.gate is None else part * x.gate[:, s, p, :, None, :])
            outs.append(out)
        return outs
    return run, "SDPA per pair + gated sum"


def _build_concat(case: Case, x: Inputs) -> Built:
    if case.kind != "peer" or case.normalize != "joint":
        raise Unsupported("one softmax over the concatenated keys gives only normalize='joint'")
    table = case.peer_table()
    structural = []  # per query stream: additive -inf mask over its concatenated keys, or None
    for s in range(case.num_streams):
        blocks, any_mask = [], False
        for p in range(case.num_streams):
            if not table[s][p]:
                continue
            allowed = _allowed_mask(case, x, s, p)
            any_mask |= allowed is not None
            if allowed is None:
                allowed = torch.ones(1, 1, 1, case.kv_lens[p], dtype=torch.bool, device=x.queries[0].device)
            blocks.append(allowed.expand(-1, -1, case.q_lens[s], -1))
        if not blocks or not any_mask:
            structural.append(None)
            continue
        batch = max(b.shape[0] for b in blocks)
        allowed = torch.cat([b.expand(batch, -1, -1, -1) for b in blocks], dim=-1)
        structural.append(torch.zeros(allowed.shape, dtype=x.queries[0].dtype, device=allowed.device)
                          .masked_fill(~allowed, float("-inf")))

    def run():
        outs = []
        for s, q in enumerate(x.queries):
            attended = [p for p in range(case.num_streams) if table[s][p]]
            if not attended:
                outs.append(q.new_zeros(q.shape[0], case.q_heads, q.shape[2], case.value_dim))
                continue
            keys = torch.cat([x.keys[p] for p in attended], dim=2)
            if x.gate is None:
                values, gqa = torch.cat([x.values[p] for p in attended], dim=2), _gqa(case)
            else:  # the gate is per query head: expand K/V to Hq heads, then pre-scale V per pair
                keys = _repeat_heads(keys, case.q_heads)
                values = torch.cat([_repeat_heads(x.values[p], case.q_heads) * x.gate[:, s, p, :, None, :]
                                    for p in attended], dim=2)
                gqa = False
            mask = structural[s]
            if x.bias is not None:
                bias = torch.cat([x.bias[:, s, p, :, None, None].expand(-1, -1, 1, case.kv_lens[p])
                                  for p in attended], dim=-1)
                mask = bias if mask is None else mask + bias
            outs.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa))
        return outs
    return run, "SDPA over concatenated keys + additive mask"


def _build_packed(case: Case, x: Inputs) -> Built:
    dense = all(all(row) for row in case.peer_table())
    if case.kind != "peer" or case.normalize != "joint" or not dense or x.gate is not None \
            or x.bias is not None or case.is_causal:
        raise Unsupported("one SDPA over the packed streams: joint, every stream attending every "
                          "stream, no gate, bias or causal self pair")
    mask = None
    if x.kv_lengths is not None:  # each stream's padding, over the packed keys
        allowed = torch.cat([_allowed_mask(case, x, 0, p) for p in range(case.num_streams)], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=x.queries[0].dtype,
                           device=allowed.device).masked_fill(~allowed, float("-inf"))
    lens = list(case.q_lens)

    def run():
        q, k, v = (torch.cat(t, dim=2) for t in (x.queries, x.keys, x.values))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=_gqa(case))
        return list(out.split(lens, dim=2))
    return run, "torch.cat of the streams + one SDPA + split"


# ---- FlexAttention -------------------------------------------------------------------------

_compiled_flex = None


def flex_fn(device: str):
    """flex_attention compiled on CUDA; eager on the CPU (forward only there, and unfused)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device != "cuda":
        return flex_attention
    if _compiled_flex is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex_call(flex, q, k, v, score_mod, block_mask, scale, gqa, want_lse):
    from torch.nn.attention.flex_attention import AuxRequest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused: we say so in the note
        if want_lse:
            out, aux = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                            enable_gqa=gqa, return_aux=AuxRequest(lse=True))
            return out, aux.lse
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa), None


def _block_mask(mask_mod, batch, q_len, kv_len, device):
    from torch.nn.attention.flex_attention import create_block_mask

    # compiled on CUDA: the eager path materialises the whole L x M mask (16k x 16k in the suites)
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device,
                             _compile=torch.device(device).type == "cuda")


def _flex_sdpa(case: Case, x: Inputs, flex) -> Tuple[Callable, str]:
    if case.dropout_p > 0:
        raise Unsupported("FlexAttention has no dropout")
    mask, device = x.attn_mask, x.queries[0].device
    block_mask = score_mod = None
    if case.is_causal:
        block_mask = _block_mask(lambda b, h, qi, ki: qi >= ki, None, case.q_lens[0], case.kv_lens[0], device)
    elif mask is not None and mask.dtype == torch.bool:
        bi = (lambda b: b) if mask.shape[0] > 1 else (lambda b: 0)
        hi = (lambda h: h) if mask.shape[1] > 1 else (lambda h: 0)
        qi_ = (lambda i: i) if mask.shape[2] > 1 else (lambda i: 0)
        block_mask = _block_mask(lambda b, h, qi, ki: mask[bi(b), hi(h), qi_(qi), ki],
                                 mask.shape[0] if mask.shape[0] > 1 else None,
                                 case.q_lens[0], case.kv_lens[0], device)
    elif mask is not None:  # float: added to the scores
        bi = (lambda b: b) if mask.shape[0] > 1 else (lambda b: 0)
        hi = (lambda h: h) if mask.shape[1] > 1 else (lambda h: 0)
        score_mod = lambda score, b, h, qi, ki: score + mask[bi(b), hi(h), qi, ki]  # noqa: E731
    scale = case.head_dim ** -0.5

    def run():
        return [_flex_call(flex, x.queries[0], x.keys[0], x.values[0], score_mod, block_mask, scale,
                           _gqa(case), False)[0]]
    return run, ""


def _flex_peer_packed(case: Case, x: Inputs, flex) -> Built:
    """Joint mode without a gate: one flex call over the packed streams; the peer table, causal
    self pairs and kv_lengths live in the block mask, the bias in the score_mod."""
    device = x.queries[0].device
    n = case.num_streams
    q_sid = torch.repeat_interleave(torch.arange(n), torch.tensor(case.q_lens)).to(device)
    kv_sid = torch.repeat_interleave(torch.arange(n), torch.tensor(case.kv_lens)).to(device)
    q_off = torch.tensor([0] + list(case.q_lens[:-1])).cumsum(0).to(device)
    kv_off = torch.tensor([0] + list(case.kv_lens[:-1])).cumsum(0).to(device)
    table = torch.tensor(case.peer_table(), dtype=torch.bool, device=device)
    kv_lengths, causal = x.kv_lengths, case.is_causal

    def mask_mod(b, h, qi, ki):
        sq, sk = q_sid[qi], kv_sid[ki]
        ok = table[sq, sk]
        if causal:
            ok = ok & ((sq != sk) | (qi - q_off[sq] >= ki - kv_off[sk]))
        if kv_lengths is not None:
            ok = ok & (ki - kv_off[sk] < kv_lengths[b, sk])
        return ok

    batch = case.batch if kv_lengths is not None else None
    block_mask = _block_mask(mask_mod, batch, sum(case.q_lens), sum(case.kv_lens), device)
    bias = x.bias
    score_mod = None
    if bias is not None:
        score_mod = lambda score, b, h, qi, ki: score + bias[0, q_sid[qi], kv_sid[ki], h]  # noqa: E731
    scale = case.head_dim ** -0.5

    def run():
        q, k, v = (torch.cat(t, dim=2) for t in (x.queries, x.keys, x.values))
        out = _flex_call(flex, q, k, v, score_mod, block_mask, scale, _gqa(case), False)[0]
        return list(out.split(list(case.q_lens), dim=2))
    return run, "one flex call over the packed streams"


# Closures, not default arguments: flex_attention ignores a mod's default arguments (seen in
# torch 2.11: every pair got the first pair's bias).
def _pair_mask_mod(causal: bool, kv_lengths: Optional[torch.Tensor]):
    def mask_mod(b, h, qi, ki):
        ok = (qi >= ki) if causal else (ki >= 0)
        return ok if kv_lengths is None else ok & (ki < kv_lengths[b])
    return mask_mod


def _head_bias_score_mod(head_bias: torch.Tensor):
    def score_mod(score, b, h, qi, ki):
        return score + head_bias[h]
    return score_mod


def _flex_peer_pairs(case: Case, x: Inputs, flex) -> Built:
    """Gates (not expressible in flex) or per-peer softmax: one flex call per attended pair, then
    the gated sum; joint mode merges the pairs with their log-sum-exps."""
    device = x.queries[0].device
    table, joint = case.peer_table(), case.normalize == "joint"
    masks = {}
    for s, p in case.attended_pairs():
        causal = case.is_causal and s == p
        lens = None if x.kv_lengths is None else x.kv_lengths[:, p]
        if not causal and lens is None:
            masks[(s, p)] = None
            continue
        masks[(s, p)] = _block_mask(_pair_mask_mod(causal, lens), case.batch if lens is not None else None,
                                    case.q_lens[s], case.kv_lens[p], device)
    bias = x.bias
    scale = case.head_dim ** -0.5

    def run():
        outs = []
        for s, q in enumerate(x.queries):
            parts, lses = [], []
            for p in range(case.num_streams):
                if not table[s][p]:
                    continue
                score_mod = None if bias is None else _head_bias_score_mod(bias[0, s, p])
                out, lse = _flex_call(flex, q, x.keys[p], x.values[p], score_mod, masks[(s, p)], scale,
                                      _gqa(case), joint)
                if x.gate is not None:
                    out = out * x.gate[:, s, p, :, None, :]
                parts.append(out)
                lses.append(lse)
            if not parts:
                outs.append(q.new_zeros(q.shape[0], case.q_heads, q.shape[2], case.value_dim))
            elif joint:  # weight each pair by its share of the joint softmax mass
                weights = torch.softmax(torch.stack(lses), dim=0).to(q.dtype)
                outs.append(sum(w[..., None] * part for w, part in zip(weights, parts)))
            else:
                outs.append(sum(parts))
        return outs
    return run, "flex per pair + gated sum"


def _build_flex(case: Case, x: Inputs) -> Built:
    try:
        from torch.nn.attention import flex_attention as _  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"FlexAttention needs torch >= 2.5 ({exc})") from None
    device = x.queries[0].device.type
    if device == "cpu" and x.queries[0].requires_grad:
        raise Unsupported("FlexAttention has no backward on the CPU")
    flex = flex_fn(device)
    if case.kind == "sdpa":
        run, note = _flex_sdpa(case, x, flex)
    elif case.normalize == "joint" and x.gate is None:
        run, note = _flex_peer_packed(case, x, flex)
    else:
        run, note = _flex_peer_pairs(case, x, flex)
    if device != "cuda":
        note = "; ".join(n for n in (note, "eager, not compiled (CPU)") if n)
    return run, note


# ---- FlashAttention-4 (CuTe DSL), when installed -----------------------------------------

def _build_fa4(case: Case, x: Inputs) -> Built:
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as exc:
        raise Unavailable(f"flash_attn.cute (FlashAttention-4) is not importable ({exc})") from None
    q = x.queries[0]
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] not in (9, 10):
        raise Unsupported("flash_attn.cute runs on Hopper and Blackwell GPUs only")
    if case.mask or case.dropout_p:
        raise Unsupported("attn_mask and dropout are not in flash_attn.cute's SDPA-like call")

    def run():  # (B, H, L, E) -> its (B, L, H, E) layout and back
        out = flash_attn_func(q.transpose(1, 2), x.keys[0].transpose(1, 2),
                              x.values[0].transpose(1, 2), causal=case.is_causal)
        out = out[0] if isinstance(out, tuple) else out
        return [out.transpose(1, 2)]
    return run, ""


# ---- the registry --------------------------------------------------------------------------

def all_providers() -> Dict[str, Provider]:
    providers = [_package(name) for name in PACKAGE_BACKENDS + ("auto",)]
    providers += [_package("torch", plan) for plan in ("pairs", "fused")]
    providers += [_torch_sdpa(label, attr) for label, attr in (
        ("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
        ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH"), ("sdpa", None))]
    providers += [
        Provider("flex", False, ("sdpa", "peer"), _build_flex),
        Provider("compose.pairs", False, ("peer",), _build_pairs),
        Provider("compose.concat", False, ("peer",), _build_concat),
        Provider("compose.packed", False, ("peer",), _build_packed),
        Provider("fa4", False, ("sdpa",), _build_fa4),
    ]
    return {p.name: p for p in providers}
