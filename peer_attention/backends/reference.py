"""The reference backend: the plain-PyTorch oracle served through the same seam as the kernels.

It runs anywhere torch runs (CPU included), in every float dtype (float16/bfloat16 computed in
float32). Its backward recomputes the forward under autograd, so its gradients are the oracle's.
"""
from __future__ import annotations

import torch

from ..decode_problem import DecodeProblem, gather_keys
from ..problem import empty_grad
from ..problem import AttentionProblem, lse_dtype, remember_keep_mask, remembered_keep_mask
from ..reference import compute_dtype, peer_attention_reference, problem_keep_mask, problem_reference
from .base import ALL_FLOAT_DTYPES, ANY, Backend, Capabilities


def _dropout_mask(problem: AttentionProblem):
    """The keep mask, drawn by the forward and reused by the backward (which then runs no random
    operation: vmap, as in gradcheck's batched-gradient check, refuses them)."""
    if problem.dropout_p <= 0 or problem.dropout_seed is None:
        return None
    keep = remembered_keep_mask(problem)
    return keep if keep is not None else remember_keep_mask(problem, problem_keep_mask(problem))


def _cast(t, dtype):
    return t if t is None or t.dtype == torch.bool else t.to(dtype)


def _run(problem: AttentionProblem, q, k, v, gate, bias, attn_mask, sinks, return_lse):
    # float16/bfloat16 are computed in float32 and rounded once at the end, as torch's math SDPA
    # does on the CPU: the CPU path is then as accurate as a fused kernel
    io_dtype = q.dtype
    compute = compute_dtype(io_dtype)
    result = problem_reference(
        problem, q.to(compute), k.to(compute), v.to(compute), _cast(gate, compute),
        _cast(bias, compute), _cast(attn_mask, compute), _cast(sinks, compute),
        dropout_mask=_dropout_mask(problem), return_lse=return_lse)
    outs, lses = result if return_lse else (result, None)
    outs = [o.to(io_dtype) for o in outs]
    return (outs, lses) if return_lse else outs


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
                                dtypes=ALL_FLOAT_DTYPES, window=True, bottom_right=True,
                                softcap=True, alibi=True, sinks=True, diagonal_peers=True)
    merged_statistics = ANY  # its backward honours the given (out, lse): see backward()

    def dropout_keep_mask(self, problem: AttentionProblem):
        return problem_keep_mask(problem)

    def forward(self, problem: AttentionProblem):
        p = problem
        outs, lses = _run(p, p.q, p.k, p.v, p.gate, p.bias, p.attn_mask, p.sinks, return_lse=True)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        lse = torch.cat(lses, dim=-1) if len(lses) > 1 else lses[0]
        return out.contiguous(), lse.to(lse_dtype(p.q.dtype)).contiguous()

    def decode_reasons(self, problem: DecodeProblem):
        return self.common_decode_reasons(problem)

    def decode(self, problem: DecodeProblem):
        """Each sequence's keys gathered out of the cache and attended by the oracle, one
        sequence at a time (bottom-right alignment on its own key count)."""
        return decode_reference(problem)

    def backward(self, problem: AttentionProblem, grad_out, out, lse, needs_grad):
        """Honours the given (out, lse) as FlashAttention's backward does: they may be the merged
        statistics of a larger attention of which this call's keys are one part (ring attention
        merges such parts), and the gradients are then this part's contributions. With the call's
        own (out, lse) they are the plain gradients."""
        p = problem
        originals = (p.q, p.k, p.v, p.gate, p.bias, p.attn_mask, p.sinks)
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(bool(need)) if t is not None else None
                for t, need in zip(originals, needs_grad)
            ]
            surrogate = _surrogate(p, leaves, out.detach(), lse.detach()).to(grad_out.dtype)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(surrogate, wanted, grad_out, allow_unused=True)
                         if wanted and surrogate.requires_grad else [None] * len(wanted))
        result = []
        for original, leaf in zip(originals, leaves):
            if leaf is None or not leaf.requires_grad:
                result.append(empty_grad(p.q))
                continue
            grad = next(grads)
            result.append(torch.zeros_like(original) if grad is None else grad.contiguous())
        return tuple(result)


def _share(own_lse, given_lse):
    """exp(own - given): the part of the given normaliser that this call's keys hold (1 when the
    given lse is the call's own; 0 where the given lse is -inf)."""
    given = given_lse.to(own_lse.dtype)
    live = torch.isfinite(given)
    share = torch.exp(own_lse - torch.where(live, given, torch.zeros_like(given)))
    return share.masked_fill(~live, 0.0)


def _surrogate(problem: AttentionProblem, leaves, out, lse):
    """A function of the inputs whose gradient (times grad_out) is the FlashAttention backward
    with the given statistics: P = exp(z - lse) and Delta = <grad_out, out>. With the call's own
    normaliser L_own, share * (O_own - out) has d/dz_j = P_j (g v_j - out), which is that
    gradient; its value is 0 and out is a constant."""
    def packed(outs, lses):
        own_out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        own_lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)
        return own_out, own_lse

    if problem.normalize != "peer":
        own_out, own_lse = packed(*_run(problem, *leaves, return_lse=True))
        share = _share(own_lse, lse)[..., None]
        return share * (own_out - out).to(share.dtype)
    # "peer": one softmax per peer, so one share per peer: run each peer column on its own.
    # The given out is that peer's (gated) part where a row attends one peer only (what ring
    # attention passes); rows attending several peers need their own statistics.
    num_streams, table = problem.num_streams, problem.peers_flat()
    single = [sum(table[s * num_streams:(s + 1) * num_streams]) == 1 for s in range(num_streams)]
    single_rows = torch.cat([torch.full((n,), flag, dtype=torch.bool, device=out.device)
                             for flag, n in zip(single, problem.q_lens)])[:, None]
    total = None
    for col in range(num_streams):
        column = tuple(int(bool(table[i]) and i % num_streams == col) for i in range(len(table)))
        if not any(column):
            continue
        own_out, own_lse = packed(*_run(problem._replace(peers=column), *leaves, return_lse=True))
        share = _share(own_lse[:, :, col], lse[:, :, col])[..., None]
        given = torch.where(single_rows, out, own_out.detach())
        term = share * (own_out - given).to(share.dtype)
        total = term if total is None else total + term
    if total is None:  # no pair attended: a zero that stays in the graph
        outs = _run(problem, *leaves, return_lse=False)
        return torch.cat(outs, dim=2) * 0.0
    return total


def decode_reference(problem: DecodeProblem):
    """(out (B, Lq, Hq, Ev), lse (B, Hq, Lq)) of a decode problem, straight from the oracle:
    float16/bfloat16 computed in float32, float64 in float64."""
    p = problem
    q = p.q
    io_dtype = q.dtype
    compute = compute_dtype(io_dtype)
    batch, q_len, num_q_heads, _ = q.shape
    k_all, v_all, _valid = gather_keys(p, p.max_seqlen)
    counts = p.seqlens.tolist()
    sinks = None if p.sinks is None else p.sinks.to(compute)
    outs, lses = [], []
    for b in range(batch):
        n = counts[b]
        keys = k_all[b:b + 1, :n].transpose(1, 2).to(compute)      # (1, H, n, E)
        values = v_all[b:b + 1, :n].transpose(1, 2).to(compute)
        slopes = None if p.alibi_slopes is None else p.alibi_slopes[b:b + 1]
        # top-left (off = 0) is bottom-right alignment with the keys' count equal to Lq's
        (out,), (lse,) = peer_attention_reference(
            [q[b:b + 1].transpose(1, 2).to(compute)], [keys], [values], scale=p.scale,
            window=(p.window_left, p.window_right), bottom_right=p.bottom_right,
            softcap=p.softcap, alibi_slopes=slopes, sinks=sinks, return_lse=True)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    if batch == 0:
        return (q.new_zeros(0, q_len, num_q_heads, p.value_dim),
                q.new_zeros(0, num_q_heads, q_len, dtype=lse_dtype(io_dtype)))
    out = torch.cat(outs).to(io_dtype).contiguous()
    return out, torch.cat(lses).to(lse_dtype(io_dtype)).contiguous()
