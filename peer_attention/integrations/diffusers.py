"""diffusers integration: SD3 / Flux joint text-image attention and Wan attention on this package.

    from peer_attention.integrations.diffusers import apply
    replaced = apply(transformer)              # e.g. pipe.transformer; returns how many processors

What `apply(model, backend=None)` replaces (diffusers 0.42):
  * `JointAttnProcessor2_0` (SD3 / SD3.5 joint blocks, also the context-pre-only last block and
    SD3.5's dual attention): image and text are two streams of one `peer_attention` call in
    "joint" mode (one softmax over both streams' keys, as over the concatenated sequence); each
    stream's output is taken as it comes, no Q/K/V concatenation and no split of the output.
  * `FluxAttnProcessor`: double-stream blocks the same way (text, image), RoPE applied to each
    stream with its own rows of the position table; single-stream blocks (already one sequence)
    through `peer_attention.scaled_dot_product_attention`.
  * `WanAttnProcessor`: self-attention and text cross-attention through the drop-in SDPA; the I2V
    cross-attention (text keys and image keys, two softmaxes whose outputs are added) as one
    `peer_attention` call in "peer" mode: the video stream's queries attend to a text and an
    image stream that have keys but no queries.

Masks: a boolean key mask (diffusers' (B, S) or (B, 1, 1, S)) whose part over each stream is
right padding (a caption padded at the end) becomes `kv_lengths`; any other mask goes through as
a mask (two-stream calls then run the drop-in SDPA over the concatenated sequence, like diffusers).
SD3's processor ignores `attention_mask`, and so does ours, so that the numbers stay the same.

diffusers' attention-backend registry (`set_attention_backend`) only accepts the members of its
closed `AttentionBackendName` enum, so "peer_attention" cannot be registered there without patching
diffusers; `apply()` swaps the processors instead. diffusers is imported only by `apply()`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import entry
from ..api import peer_attention, scaled_dot_product_attention

# Wan's processor takes the last 512 context tokens as text (diffusers hard-codes this too)
WAN_TEXT_TOKENS = 512


# ---- masks ----------------------------------------------------------------------------------

def _key_mask_rows(mask: Tensor, batch: int, total_keys: int) -> Optional[Tensor]:
    """The (B', total) rows of a key-only bool mask ((B, S) or (B|1, 1, 1, S)); None if not one."""
    if mask.dtype != torch.bool or mask.shape[-1] != total_keys:
        return None
    if mask.dim() == 2 and mask.shape[0] == batch:
        return mask
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[0] in (1, batch):
        return mask[:, 0, 0]
    return None


def right_padding_lengths(mask: Optional[Tensor], batch: int, lengths: Sequence[int]) -> Optional[Tensor]:
    """kv_lengths (B, S) for a bool key mask over the streams' keys laid end to end, when the
    mask's part over every stream is right padding (True then False); None when it is not."""
    if mask is None:
        return None
    rows = _key_mask_rows(mask, batch, sum(lengths))
    if rows is None:
        return None
    counts, start = [], 0
    for n in lengths:
        part = rows[:, start:start + n]
        kept = part.sum(dim=1)
        if not torch.equal(part, torch.arange(n, device=part.device)[None, :] < kept[:, None]):
            return None
        counts.append(kept)
        start += n
    return torch.stack(counts, dim=1).expand(batch, len(lengths)).to(torch.int64).contiguous()


def _as_sdpa_mask(mask: Optional[Tensor], batch: int, num_keys: int) -> Optional[Tensor]:
    """diffusers' native backend reads a (B, S) mask as (B, 1, 1, S); any other shape as is."""
    if mask is not None and mask.dim() == 2 and mask.shape == (batch, num_keys):
        return mask[:, None, None, :]
    return mask


# ---- processors -----------------------------------------------------------------------------

class _Processor:
    """What the three processors share: the backend, and refusing options they do not serve."""

    # diffusers' set_attention_backend / context parallelism write these on a processor
    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: Optional[str] = None):
        self.backend = backend

    def _check_options(self) -> None:
        if self._parallel_config is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: context parallelism (parallel_config) is not supported; "
                "restore diffusers' processors to use it")
        if self._attention_backend is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: set_attention_backend({str(self._attention_backend)!r}) after "
                "peer_attention's apply() is not supported; this processor always runs peer_attention")

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """(B, H, L, E) layout in and out; the mask read as diffusers' native backend reads it."""
        mask = _as_sdpa_mask(mask, q.shape[0], k.shape[2])
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=self.backend)

    def _joint(self, queries: List[Tensor], keys: List[Tensor], values: List[Tensor],
               mask: Optional[Tensor]) -> List[Tensor]:
        """Joint softmax over the streams' keys, as SDPA over the concatenated sequence (B, H, L, E)."""
        batch = queries[0].shape[0]
        key_lens = [k.shape[2] for k in keys]
        kv_lengths = right_padding_lengths(mask, batch, key_lens)
        if mask is None or kv_lengths is not None:
            return peer_attention(queries, keys, values, normalize="joint", kv_lengths=kv_lengths,
                                  backend=self.backend)
        # a mask that is not per-stream right padding goes through as a mask, on the joint sequence
        out = self._sdpa(torch.cat(queries, dim=2), torch.cat(keys, dim=2), torch.cat(values, dim=2), mask)
        return list(out.split([q.shape[2] for q in queries], dim=2))


def _heads_first(x: Tensor) -> Tensor:
    """(B, L, H, D) -> (B, H, L, D)."""
    return x.transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, L, H * D)."""
    return x.transpose(1, 2).flatten(2, 3)


class JointAttnProcessor(_Processor):
    """SD3 / SD3.5: diffusers' JointAttnProcessor2_0 with the image and text streams of one
    joint peer_attention call instead of concatenation, SDPA and a split."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, *args, **kwargs):
        # attention_mask is ignored, as by JointAttnProcessor2_0
        self._check_options()
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def split_heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is None:
            out = self._sdpa(query, key, value, None)
            return attn.to_out[1](attn.to_out[0](_merge_heads(out).to(query.dtype)))

        text_query = split_heads(attn.add_q_proj(encoder_hidden_states))
        text_key = split_heads(attn.add_k_proj(encoder_hidden_states))
        text_value = split_heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        # diffusers casts the joint output to the dtype of the concatenated queries
        out_dtype = torch.promote_types(query.dtype, text_query.dtype)
        image_out, text_out = self._joint([query, text_query], [key, text_key], [value, text_value], None)
        image_out, text_out = _merge_heads(image_out).to(out_dtype), _merge_heads(text_out).to(out_dtype)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, text_out


def _flux_projections(attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor]):
    """FluxAttention's q/k/v of the image stream and, when there is a text stream, of the text."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    text = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False):
            text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                    attn.add_v_proj(encoder_hidden_states))
    return query, key, value, text


class FluxAttnProcessor(_Processor):
    """Flux: double-stream blocks as a joint (text, image) peer_attention call, RoPE rows split
    between the streams; single-stream blocks as the drop-in SDPA."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None):
        from diffusers.models.embeddings import apply_rotary_emb

        self._check_options()
        query, key, value, text = _flux_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if text is None:  # single-stream block, or no text: one sequence (B, L, H, D)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            out = self._sdpa(_heads_first(query), _heads_first(key), _heads_first(value), attention_mask)
            out = _merge_heads(out).to(query.dtype)
            if encoder_hidden_states is not None:  # as diffusers: a context without its projections
                return self._project_outputs(attn, out, encoder_hidden_states.shape[1])
            return out

        text_query, text_key, text_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in text)
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        if image_rotary_emb is not None:  # the position table covers the text rows, then the image's
            text_len = text_query.shape[1]
            cos, sin = image_rotary_emb
            text_rope, image_rope = (cos[:text_len], sin[:text_len]), (cos[text_len:], sin[text_len:])
            text_query = apply_rotary_emb(text_query, text_rope, sequence_dim=1)
            text_key = apply_rotary_emb(text_key, text_rope, sequence_dim=1)
            query = apply_rotary_emb(query, image_rope, sequence_dim=1)
            key = apply_rotary_emb(key, image_rope, sequence_dim=1)
        out_dtype = torch.promote_types(text_query.dtype, query.dtype)
        text_out, image_out = self._joint(
            [_heads_first(text_query), _heads_first(query)], [_heads_first(text_key), _heads_first(key)],
            [_heads_first(text_value), _heads_first(value)], attention_mask)
        image_out = attn.to_out[1](attn.to_out[0](_merge_heads(image_out).to(out_dtype).contiguous()))
        text_out = attn.to_add_out(_merge_heads(text_out).to(out_dtype).contiguous())
        return image_out, text_out

    @staticmethod
    def _project_outputs(attn, out: Tensor, text_len: int):
        """diffusers' split of a joint output whose context had no projections of its own."""
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())


def _wan_rope(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's interleaved rotary embedding on (B, L, H, D), the same operations as diffusers'."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _wan_projections(attn, hidden_states: Tensor, context: Tensor):
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _wan_image_projections(attn, image_context: Tensor):
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


class WanAttnProcessor(_Processor):
    """Wan 2.x: self- and text cross-attention as the drop-in SDPA; I2V cross-attention (text
    and image keys, separately normalised, outputs added) as one "peer" mode call."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 rotary_emb: Optional[Tuple[Tensor, Tensor]] = None):
        self._check_options()
        image_context = None
        if attn.add_k_proj is not None:
            image_len = encoder_hidden_states.shape[1] - WAN_TEXT_TOKENS
            image_context = encoder_hidden_states[:, :image_len]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = _wan_projections(attn, hidden_states, context)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        query, key, value = _heads_first(query), _heads_first(key), _heads_first(value)

        if image_context is None:
            out = _merge_heads(self._sdpa(query, key, value, attention_mask)).type_as(query)
        else:
            image_key, image_value = _wan_image_projections(attn, image_context)
            image_key = _heads_first(attn.norm_added_k(image_key).unflatten(2, (attn.heads, -1)))
            image_value = _heads_first(image_value.unflatten(2, (attn.heads, -1)))
            out = self._text_and_image(query, key, value, image_key, image_value, attention_mask)
        return attn.to_out[1](attn.to_out[0](out))

    def _text_and_image(self, query, key, value, image_key, image_value, mask) -> Tensor:
        """Video queries against the text and image key streams, each normalised on its own."""
        batch, heads, _, head_dim = query.shape
        text_lengths = right_padding_lengths(mask, batch, [key.shape[2]])
        if mask is not None and text_lengths is None:
            # a mask that is not right padding goes through as a mask: two SDPA calls, as diffusers
            image_out = _merge_heads(self._sdpa(query, image_key, image_value, None)).type_as(query)
            text_out = _merge_heads(self._sdpa(query, key, value, mask)).type_as(query)
            return text_out + image_out
        no_keys = query.new_empty(batch, heads, 0, head_dim)
        no_values = value.new_empty(batch, heads, 0, value.shape[-1])
        no_queries = query.new_empty(batch, heads, 0, head_dim)
        kv_lengths = None
        if text_lengths is not None:
            zeros = torch.zeros_like(text_lengths)
            full = torch.full_like(text_lengths, image_key.shape[2])
            kv_lengths = torch.cat([zeros, text_lengths, full], dim=1)
        video_out = peer_attention(
            [query, no_queries, no_queries], [no_keys, key, image_key], [no_values, value, image_value],
            peers=[[False, True, True], [False, False, False], [False, False, False]],
            normalize="peer", kv_lengths=kv_lengths, backend=self.backend)[0]
        return _merge_heads(video_out).type_as(query)


# ---- apply ----------------------------------------------------------------------------------

def _processor_table():
    """diffusers' processor class -> ours, and the classes of these families we cannot serve."""
    from diffusers.models import attention_processor as ap
    from diffusers.models.transformers import transformer_flux, transformer_wan

    ours = {ap.JointAttnProcessor2_0: JointAttnProcessor,
            transformer_flux.FluxAttnProcessor: FluxAttnProcessor,
            transformer_wan.WanAttnProcessor: WanAttnProcessor}
    unsupported = {
        ap.FusedJointAttnProcessor2_0: "fused QKV projections (call model.unfuse_qkv_projections() first)",
        transformer_flux.FluxIPAdapterAttnProcessor: "IP-Adapter (FluxIPAdapterAttnProcessor)",
    }
    for name, why in (("PAGJointAttnProcessor2_0", "perturbed-attention guidance"),
                      ("PAGCFGJointAttnProcessor2_0", "perturbed-attention guidance"),
                      ("SD3IPAdapterJointAttnProcessor2_0", "IP-Adapter")):
        if hasattr(ap, name):
            unsupported[getattr(ap, name)] = f"{why} ({name})"
    return ours, unsupported


def apply(model: torch.nn.Module, *, backend: Optional[str] = None) -> int:
    """Replace the attention processors of `model` that this package serves (SD3 joint, Flux,
    Wan); return how many were replaced. `backend` is passed to every attention call."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply(model): expected a torch.nn.Module (a diffusers model), "
                        f"got {type(model).__name__}")
    entry.check_backend_name(backend)
    ours, unsupported = _processor_table()
    targets = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if type(processor) in unsupported:
            raise NotImplementedError(
                f"apply({type(model).__name__}): the processor of {name or 'the model'} uses "
                f"{unsupported[type(processor)]}, which peer_attention's processors do not serve")
        if type(processor) in ours:
            targets.append((module, ours[type(processor)]))
    if not targets:
        raise TypeError(
            f"apply(model): {type(model).__name__} has no attention processor peer_attention serves "
            f"(expected {', '.join(sorted(cls.__name__ for cls in ours))})")
    for module, cls in targets:
        module.set_processor(cls(backend))
    return len(targets)
