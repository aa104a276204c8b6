"""Tiny randomly initialised diffusers models (built from configs, nothing downloaded) and their
inputs, for the integration tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

WAN_TEXT_TOKENS = 512  # Wan's I2V processor takes the last 512 context tokens as text


@dataclass(frozen=True)
class TinyModel:
    name: str
    build: Callable[[], torch.nn.Module]             # float32 parameters, seeded
    inputs: Callable[[torch.dtype, bool], Dict]      # forward kwargs (float ones as leaves)
    replaced: int                                    # processors apply() must replace
    peer_calls: int                                  # of them, peer_attention calls per forward


def _rand(gen, *shape, dtype, grad):
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)


def sd3(layers: int = 2, tokens: int = 8, text: int = 5, batch: int = 2) -> TinyModel:
    """SD3.5-like: qk RMSNorm, dual attention in block 0, the last block context-pre-only."""
    side = int(round((tokens * 4) ** 0.5))  # patch 2: (side / 2) ** 2 image tokens

    def build():
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        return SD3Transformer2DModel(
            sample_size=side, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=8, out_channels=4, pos_embed_max_size=side,
            dual_attention_layers=(0,), qk_norm="rms_norm")

    def inputs(dtype, grad):
        gen = torch.Generator().manual_seed(1)
        return dict(hidden_states=_rand(gen, batch, 4, side, side, dtype=dtype, grad=grad),
                    encoder_hidden_states=_rand(gen, batch, text, 16, dtype=dtype, grad=grad),
                    pooled_projections=_rand(gen, batch, 8, dtype=dtype, grad=False),
                    timestep=torch.tensor([3.0, 700.0][:batch]).to(dtype))

    return TinyModel("sd3", build, inputs, replaced=layers + 1, peer_calls=layers)


def flux(double: int = 1, single: int = 1, tokens: int = 12, text: int = 6, batch: int = 2,
         text_padding: str = "") -> TinyModel:
    """Flux: RoPE over text then image ids. `text_padding`: "right", a caption mask (True =
    token) whose last 2 tokens of the last batch element are padding, passed as diffusers passes
    one; "inside", the same 2 masked tokens in the middle of the caption."""
    def build():
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=double, num_single_layers=single,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
            pooled_projection_dim=8, axes_dims_rope=(4, 4, 8))

    def inputs(dtype, grad):
        gen = torch.Generator().manual_seed(2)
        img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], dim=1)
        kwargs = dict(hidden_states=_rand(gen, batch, tokens, 4, dtype=dtype, grad=grad),
                      encoder_hidden_states=_rand(gen, batch, text, 16, dtype=dtype, grad=grad),
                      pooled_projections=_rand(gen, batch, 8, dtype=dtype, grad=False),
                      timestep=torch.tensor([0.1, 0.9][:batch]).to(dtype),
                      img_ids=img_ids.to(dtype), txt_ids=torch.zeros(text, 3, dtype=dtype))
        if text_padding:
            caption = torch.ones(batch, text, dtype=torch.bool)
            first = text - 2 if text_padding == "right" else 1
            caption[-1, first:first + 2] = False
            mask = torch.cat([caption, torch.ones(batch, tokens, dtype=torch.bool)], dim=1)
            kwargs["joint_attention_kwargs"] = {"attention_mask": mask}
        return kwargs

    return TinyModel("flux", build, inputs, replaced=double + single, peer_calls=double)


def wan_i2v(frames: int = 2, side: int = 4, image_tokens: int = 5, batch: int = 1) -> TinyModel:
    """Wan 2.1 I2V: image_dim and added_kv_proj_dim set, so cross-attention has image keys/values."""
    def build():
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, image_dim=8, added_kv_proj_dim=16,
            rope_max_seq_len=32)

    def inputs(dtype, grad):
        gen = torch.Generator().manual_seed(3)
        return dict(hidden_states=_rand(gen, batch, 4, frames, side, side, dtype=dtype, grad=grad),
                    timestep=torch.tensor([500] * batch),
                    encoder_hidden_states=_rand(gen, batch, WAN_TEXT_TOKENS, 16, dtype=dtype, grad=grad),
                    encoder_hidden_states_image=_rand(gen, batch, image_tokens, 8, dtype=dtype, grad=grad))

    return TinyModel("wan_i2v", build, inputs, replaced=2, peer_calls=1)
