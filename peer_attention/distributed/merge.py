"""Log-sum-exp merge of partial attention results over disjoint key sets.

If (o1, l1) and (o2, l2) are softmax-weighted outputs and log normalisers over two disjoint key
sets, the result over their union is l = log(e^l1 + e^l2), o = e^(l1-l) o1 + e^(l2-l) o2. It holds
for a gated value (the gate is constant per peer) and with a bias (part of each score), so in
"joint" mode partial results merge as they come; in "peer" mode each peer has its own softmax,
so they merge per peer. Rows with l = -inf (nothing attended yet) keep weight 0, never NaN
(peer_attention/lse_merge.py, shared with the torch backend's merge of stream pairs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..lse_merge import safe_logsumexp


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor,
               rows: Optional[Tensor] = None) -> None:
    """acc <- merge(acc, (out, lse)) in place; acc in the statistics dtype (fp32 or fp64).
    acc_out (..., T, Ev), acc_lse (..., T); `rows` (T',) picks the rows out/lse belong to."""
    if rows is not None:
        sub_out, sub_lse = acc_out.index_select(-2, rows), acc_lse.index_select(-1, rows)
        merge_into(sub_out, sub_lse, out, lse)
        acc_out.index_copy_(-2, rows, sub_out)
        acc_lse.index_copy_(-1, rows, sub_lse)
        return
    lse = lse.to(acc_lse.dtype)
    total, shift = safe_logsumexp([acc_lse, lse], acc_lse.dtype)
    keep = torch.exp(acc_lse - shift)[..., None]
    add = torch.exp(lse - shift)[..., None]
    acc_out.mul_(keep).add_(add * out.to(acc_out.dtype))
    acc_lse.copy_(total)
