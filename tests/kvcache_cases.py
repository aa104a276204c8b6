"""Cases and an independent oracle for flash_attn_with_kvcache (SPEC section 12).

The oracle is written from the SPEC, apart from the package: rotary through complex numbers
(interleaved) or explicit halves (GPT-NeoX), the cache update as a Python loop over sequences and
positions, and attention as one explicit softmax per sequence in float64."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

F64 = torch.float64


class Case(NamedTuple):
    batch: int = 3
    q_len: int = 1
    new_len: int = 1            # rows of k/v appended (0: none)
    heads: int = 2              # H (key/value heads)
    group: int = 2              # Hq / H
    head_dim: int = 16
    value_dim: int = 8
    capacity: int = 40          # S_max, or max_blocks * page_size
    page_size: Optional[int] = None  # paged when set
    batch_idx: bool = False
    leftpad: bool = False
    rotary: Optional[str] = None     # "interleaved" | "neox"
    rotary_dim: int = 8


def make_inputs(case: Case, dtype=torch.float32, seed: int = 0, device="cpu"):
    """Inputs as a dict of flash_attn_with_kvcache's keyword arguments (on `device`)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    c = case
    hq = c.heads * c.group
    seqlens = [(7 * b + 5) % (c.capacity - c.new_len - 2) + 2 for b in range(c.batch)]
    seqlens[-1] = c.capacity - c.new_len  # one sequence fills its cache
    rows = list(range(c.batch))
    batch_cache = c.batch
    if c.batch_idx:
        batch_cache = c.batch + 2
        rows = [(2 * b + 1) % batch_cache for b in range(c.batch)]
    k_full = randn(batch_cache, c.capacity, c.heads, c.head_dim)
    v_full = randn(batch_cache, c.capacity, c.heads, c.value_dim)
    args = dict(q=randn(c.batch, c.q_len, hq, c.head_dim),
                cache_seqlens=torch.tensor(seqlens, dtype=torch.int32))
    if c.new_len:
        args["k"] = randn(c.batch, c.new_len, c.heads, c.head_dim)
        args["v"] = randn(c.batch, c.new_len, c.heads, c.value_dim)
    if c.batch_idx:
        args["cache_batch_idx"] = torch.tensor(rows, dtype=torch.int32)
    if c.leftpad:
        args["cache_leftpad"] = torch.tensor([min(b + 1, n) for b, n in enumerate(seqlens)],
                                             dtype=torch.int32)
    if c.rotary:
        angles = torch.rand(c.capacity + c.q_len, c.rotary_dim // 2, generator=g, dtype=F64) * 6
        args["rotary_cos"], args["rotary_sin"] = angles.cos().to(dtype), angles.sin().to(dtype)
        args["rotary_interleaved"] = c.rotary == "interleaved"
    if c.page_size is None:
        args["k_cache"], args["v_cache"] = k_full, v_full
    else:  # the same sequences scattered over shuffled pages, plus spare pages
        per_seq = c.capacity // c.page_size
        num_blocks = c.batch * per_seq + 3
        order = torch.randperm(num_blocks, generator=g)[:c.batch * per_seq].view(c.batch, per_seq)
        k_pages = randn(num_blocks, c.page_size, c.heads, c.head_dim)
        v_pages = randn(num_blocks, c.page_size, c.heads, c.value_dim)
        for b in range(c.batch):
            for j in range(per_seq):
                span = slice(j * c.page_size, (j + 1) * c.page_size)
                k_pages[order[b, j]] = k_full[b, span]
                v_pages[order[b, j]] = v_full[b, span]
        args["k_cache"], args["v_cache"] = k_pages, v_pages
        args["block_table"] = order.to(torch.int32)
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in args.items()}


def on_cpu(args):
    return {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in args.items()}


def contiguous_view(args, case: Case):
    """(k, v) (B, capacity, H, .) of each sequence's cache (rows or pages put back in order)."""
    args = on_cpu(args)
    kc, vc = args["k_cache"], args["v_cache"]
    if case.page_size is None:
        rows = args.get("cache_batch_idx")
        rows = rows.long() if rows is not None else torch.arange(case.batch)
        return kc[rows], vc[rows]
    table = args["block_table"].long()
    return (torch.stack([kc[table[b]].flatten(0, 1) for b in range(case.batch)]),
            torch.stack([vc[table[b]].flatten(0, 1) for b in range(case.batch)]))


def rotate(x, cos, sin, positions, interleaved: bool):
    """x (L, H, E) float64, rows rotated at positions (L,)."""
    rd = 2 * cos.shape[1]
    out = x.clone()
    for i, pos in enumerate(positions):
        c, s = cos[pos].to(F64), sin[pos].to(F64)
        if interleaved:
            pairs = torch.view_as_complex(x[i, :, :rd].reshape(x.shape[1], rd // 2, 2).contiguous())
            turned = torch.view_as_real(pairs * torch.complex(c, s)).reshape(x.shape[1], rd)
            out[i, :, :rd] = turned
        else:
            x1, x2 = x[i, :, :rd // 2], x[i, :, rd // 2:rd]
            out[i, :, :rd // 2] = x1 * c - x2 * s
            out[i, :, rd // 2:rd] = x2 * c + x1 * s
    return out


def expected_caches(args, case: Case):
    """The whole k_cache / v_cache after the append, in float64: a loop over sequences and new
    positions, each row written to its cache row (cache_batch_idx) or page (block_table)."""
    args = on_cpu(args)
    k_cache, v_cache = args["k_cache"].to(F64).clone(), args["v_cache"].to(F64).clone()
    for b, n in enumerate(args["cache_seqlens"].tolist()):
        positions = list(range(n, n + case.new_len))
        if not positions:
            continue
        k_new = args["k"][b].to(F64)
        if case.rotary:
            k_new = rotate(k_new, args["rotary_cos"], args["rotary_sin"], positions,
                           args["rotary_interleaved"])
        for i, pos in enumerate(positions):
            if case.page_size is None:
                row = int(args["cache_batch_idx"][b]) if case.batch_idx else b
                where = (row, pos)
            else:
                where = (int(args["block_table"][b, pos // case.page_size]), pos % case.page_size)
            k_cache[where] = k_new[i]
            v_cache[where] = args["v"][b, i].to(F64)
    return k_cache, v_cache


def oracle(args, case: Case, k_seq, v_seq, *, causal=False, window_size=(-1, -1), softcap=0.0,
           alibi_slopes=None, sinks=None, softmax_scale=None, dtype=F64):
    """(out (B, Lq, Hq, Ev), lse (B, Hq, Lq)) from the caches after the append, computed in
    `dtype` (float64 for the exact answer), on the CPU."""
    args = on_cpu(args)
    alibi_slopes = None if alibi_slopes is None else alibi_slopes.cpu()
    sinks = None if sinks is None else sinks.cpu()
    q_all = args["q"].to(F64)
    batch, q_len, hq, head_dim = q_all.shape
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
    left, right = window_size
    if causal:
        right = 0
    banded = left >= 0 or right >= 0
    pads = args.get("cache_leftpad")
    outs, lses = [], []
    for b, n in enumerate(args["cache_seqlens"].tolist()):
        start = int(pads[b]) if pads is not None else 0
        end = n + case.new_len
        keys = k_seq[b, start:end].repeat_interleave(case.group, dim=1).to(dtype)   # (nk, Hq, E)
        values = v_seq[b, start:end].repeat_interleave(case.group, dim=1).to(dtype)
        q = q_all[b]
        if case.rotary:
            positions = [n + i if banded else n for i in range(q_len)]
            q = rotate(q, args["rotary_cos"], args["rotary_sin"], positions,
                       args["rotary_interleaved"])
            if dtype != F64:  # the kernels round the rotated q to the input dtype
                q = q.to(args["q"].dtype)
        q = q.to(dtype)
        nk = keys.shape[0]
        z = torch.einsum("ihe,jhe->hij", q, keys) * scale
        if softcap > 0:
            z = softcap * torch.tanh(z / softcap)
        d = (torch.arange(nk)[None, :] - torch.arange(q_len)[:, None] - (nk - q_len))
        if alibi_slopes is not None:
            slopes = alibi_slopes.expand(batch, hq)[b].to(dtype)
            z = z - slopes[:, None, None] * d.abs().to(dtype)
        allowed = torch.ones(q_len, nk, dtype=torch.bool)
        if right >= 0:
            allowed &= d <= right
        if left >= 0:
            allowed &= d >= -left
        z = z.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            z = torch.cat([z, sinks.to(dtype)[:, None, None].expand(hq, q_len, 1)], -1)
        top = z.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(z - top)
        total = w.sum(-1, keepdim=True)
        w = w / torch.where(total > 0, total, torch.ones_like(total))
        out = torch.einsum("hij,jhe->ihe", w[..., :nk], values)
        outs.append(out)
        lses.append((top + torch.log(total)).squeeze(-1))
    return torch.stack(outs), torch.stack(lses)


def spec8_tolerance(got, exact, in_dtype_result) -> float:
    """SPEC section 8's bound for `got` against the float64 `exact`: float32 1e-4; 16-bit
    2x the error of the same computation in the input dtype, + 1e-5."""
    if got.dtype == torch.float32 or got.dtype == F64:
        return 1e-4
    return 2 * (in_dtype_result.double() - exact).abs().max().item() + 1e-5


ORACLE_OPTIONS = ("causal", "window_size", "softcap", "alibi_slopes", "sinks", "softmax_scale")
ROTATED_CACHE_ATOL = {F64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run_and_check(case: Case, backend: str, dtype=torch.float32, seed: int = 0, device="cpu",
                  **options):
    """One flash_attn_with_kvcache call on `case`: the caches must hold exactly the appended rows
    (and nothing else changed), the output and lse must match the oracle (SPEC section 8).
    Returns (out, lse, args)."""
    import peer_attention as pa

    args = make_inputs(case, dtype, seed, device)
    options = {name: t.to(device) if isinstance(t, torch.Tensor) else t
               for name, t in options.items()}
    want_k, want_v = expected_caches(args, case)
    out, lse = pa.flash_attn_with_kvcache(**args, return_softmax_lse=True, backend=backend,
                                          **options)
    cache_atol = ROTATED_CACHE_ATOL[dtype] if case.rotary else 0.0
    torch.testing.assert_close(args["k_cache"].cpu().to(F64), want_k, rtol=0, atol=cache_atol)
    torch.testing.assert_close(args["v_cache"].cpu().to(F64), want_v, rtol=0, atol=0)
    k_seq, v_seq = (t.to(F64) for t in contiguous_view(args, case))
    wanted = {name: options[name] for name in ORACLE_OPTIONS if name in options}
    exact_out, exact_lse = oracle(args, case, k_seq, v_seq, **wanted)
    hq = case.heads * case.group
    assert out.shape == (case.batch, case.q_len, hq, case.value_dim) and out.dtype == dtype
    assert lse.shape == (case.batch, hq, case.q_len) and lse.dtype == torch.float32
    if dtype == F64:
        tol = 1e-10
    elif dtype == torch.float32:
        tol = 1e-4
    else:
        in_dtype, _ = oracle(args, case, k_seq.to(dtype), v_seq.to(dtype), dtype=dtype, **wanted)
        tol = spec8_tolerance(out, exact_out, in_dtype)
    out, lse = out.cpu(), lse.cpu()
    err = (out.double() - exact_out).abs().max().item()
    assert err <= tol, f"out: max error {err} > {tol}"
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ"
    lse_err = (lse.double() - exact_lse)[finite].abs().max().item() if finite.any() else 0.0
    assert lse_err <= max(tol, 1e-5), f"lse: max error {lse_err}"
    return out, lse, args
