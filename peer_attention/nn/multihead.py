"""MultiheadAttention: a drop-in for torch.nn.MultiheadAttention on the fused kernels.

It subclasses torch's module, so the constructor, the parameters, their initialisation and the
state_dict keys are torch's own (in_proj_weight or q/k/v_proj_weight, in_proj_bias, out_proj,
bias_k, bias_v); only forward is replaced. Forward follows torch's semantics, quirks included:
  * bool masks use torch's convention here: True = masked (the opposite of SDPA's); both bool
    and float masks are turned into additive float masks and key_padding_mask is added to
    attn_mask, as torch does;
  * is_causal is only a hint that attn_mask is causal: it needs attn_mask, and it replaces the
    mask by the kernel's causal mask only when there is no key_padding_mask and
    need_weights=False (otherwise attn_mask itself is applied);
  * 2-D inputs are one unbatched sequence; batch_first is ignored for them;
  * need_weights=True computes the attention weights in plain PyTorch exactly as torch does
    (the fused kernel never forms them); otherwise the attention is one call of
    peer_attention.scaled_dot_product_attention (dropout only in training).
torch's inference fast path (torch._native_multi_head_attention) is not used.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import scaled_dot_product_attention


def _additive_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """torch's convention: a bool mask marks masked positions (-> -inf), a float mask is added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def _check_shapes(query, key, value, key_padding_mask, attn_mask, num_heads) -> bool:
    """torch's shape rules; returns whether the input is batched (3-D)."""
    if query.dim() not in (2, 3):
        raise AssertionError(
            f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")
    batched = query.dim() == 3
    want = 3 if batched else 2
    if key.dim() != want or value.dim() != want:
        raise AssertionError(f"For {'batched (3-D)' if batched else 'unbatched (2-D)'} `query`, expected "
                             f"`key` and `value` to be {want}-D but found {key.dim()}-D and "
                             f"{value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != want - 1:
        raise AssertionError(f"expected `key_padding_mask` to be `None` or {want - 1}-D but found "
                             f"{key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(f"expected `attn_mask` to be `None`, 2-D or 3-D but found "
                                 f"{attn_mask.dim()}-D tensor instead")
        if not batched and attn_mask.dim() == 3:
            expected = (num_heads, query.shape[0], key.shape[0])
            if tuple(attn_mask.shape) != expected:
                raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
    return batched


class MultiheadAttention(nn.MultiheadAttention):
    """Same constructor, parameters and forward signature as torch.nn.MultiheadAttention."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        batched = _check_shapes(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=2)
        key_padding_mask = _additive_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _additive_mask(attn_mask, "attn_mask", query.dtype)
        if batched and self.batch_first:  # work sequence-first, (L, N, E), as torch does
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        use_causal_kernel = is_causal and key_padding_mask is None and not need_weights
        if use_causal_kernel:
            attn_mask = None  # the hint promises attn_mask is causal: the kernel masks instead

        q, k, v, mask = self._project(query, key, value, key_padding_mask, attn_mask)
        dropout_p = self.dropout if self.training else 0.0
        tgt_len, bsz = query.shape[0], query.shape[1]
        if need_weights:
            out, weights = self._attention_with_weights(q, k, v, mask, dropout_p)
            weights = weights.view(bsz, self.num_heads, tgt_len, k.shape[1])
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out, weights = self._fused_attention(q, k, v, mask, dropout_p, use_causal_kernel, bsz), None

        # out: (N*H, L, hd) -> (L, N, E), then the output projection
        out = out.transpose(0, 1).contiguous().view(tgt_len * bsz, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    # ------------------------------------------------------------------------------------------
    def _project(self, query, key, value, key_padding_mask, attn_mask):
        """In-projections, bias_k/v, zero attention and the merged additive mask.

        Returns q (N*H, L, hd), k and v (N*H, S', hd) and the mask, None or broadcastable to
        (N*H, L, S') as 3-D (1 or N*H, 1 or L, S').
        """
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match "
                                     f"value's {value.shape[:2]}")
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                       f"should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should "
                                   f"be {(bsz * heads, tgt_len, src_len)}.")

        def extend_masks(attn_mask, key_padding_mask):
            # one more key (bias_k or the zero key) that every query may attend to
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
            return attn_mask, key_padding_mask

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = extend_masks(attn_mask, key_padding_mask)
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must be both set or both None")

        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros.to(v.dtype)], dim=1)
            attn_mask, key_padding_mask = extend_masks(attn_mask, key_padding_mask)

        src_len = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise AssertionError(f"Expected key_padding_mask of shape {(bsz, src_len)}, "
                                     f"got {tuple(key_padding_mask.shape)}")
            per_head = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                        .reshape(bsz * heads, 1, src_len))
            attn_mask = per_head if attn_mask is None else attn_mask + per_head
        return q, k, v, attn_mask

    def _attention_with_weights(self, q, k, v, mask, dropout_p):
        """Plain PyTorch, the same operations as torch's need_weights path."""
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if mask is not None:
            scores = torch.baddbmm(mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.bmm(weights, v), weights

    def _fused_attention(self, q, k, v, mask, dropout_p, is_causal, bsz):
        heads = self.num_heads
        q = q.view(bsz, heads, q.shape[1], q.shape[2])
        k = k.view(bsz, heads, k.shape[1], k.shape[2])
        v = v.view(bsz, heads, v.shape[1], v.shape[2])
        if mask is not None:  # (1 or N*H, 1 or L, S') -> broadcastable to (N, H, L, S')
            mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.reshape(bsz, heads, mask.shape[1], -1)
        out = scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
        return out.flatten(0, 1)  # (N*H, L, hd)
