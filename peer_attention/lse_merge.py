"""The log-sum-exp merge of partial attention results over disjoint key sets.

If (o_t, l_t) are softmax-weighted outputs and log normalisers over disjoint key sets, the result
over their union is L = log sum_t e^(l_t), O = sum_t e^(l_t - L) o_t (MATH.md). The torch
backend merges its stream pairs this way (backends/torch_backend.py), ring attention its key
blocks (distributed/merge.py). Rows with L = -inf (nothing attended) weigh every term 0, never nan.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def safe_logsumexp(terms: List[Tensor], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(L, S): L = logsumexp of the terms, -inf on rows where every term is -inf, and S = L
    with those rows at the smallest finite number of `dtype`, so that a term's weight
    exp(term - S) is 0 there (not nan) and exp(term - L) elsewhere. One or two terms (the common
    case) skip torch.stack."""
    if len(terms) == 1:
        total = terms[0]
    elif len(terms) == 2:
        total = torch.logaddexp(terms[0], terms[1])
    else:
        total = torch.stack(terms).logsumexp(0)
    return total, total.clamp_min(torch.finfo(dtype).min)
