"""Zero-size dimensions (issue 20): every entry point on every backend gives a result of the right
shape (zeros where a row has no key) with gradients of the right shape, or a ValueError naming the
argument, never a dead process (torch's own CPU kernel dies with SIGFPE on zero heads).

Each backend's cases first run in a child process (forward and backward): a case that kills it
fails its test here instead of killing pytest, and is not run in-process. Then every case runs
in-process and is checked: shapes, zeros where nothing is attended, values and gradients against
the reference backend (and torch's math SDPA where torch serves the call)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import peer_attention as pa

ROOT = Path(__file__).resolve().parents[1]
F32 = torch.float32
BACKENDS = ("reference", "torch", "triton")


def _t(*shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randn(*shape, generator=gen, dtype=F32).requires_grad_()


def sdpa(q, k, v, **kw):
    def run(backend):
        args = [_t(*q), _t(*k), _t(*v)]
        mask = kw.get("attn_mask")
        extra = dict(kw)
        if mask == "bool":
            extra["attn_mask"] = torch.ones(q[-2], k[-2], dtype=torch.bool)
        elif mask == "float":
            extra["attn_mask"] = _t(q[-2], k[-2])
            args.append(extra["attn_mask"])
        out = pa.scaled_dot_product_attention(*args[:3], backend=backend, **extra)
        return [out], args
    return run


def peer(q_lens, kv_lens, batch=2, heads=2, kv_heads=None, dim=4, **kw):
    kv_heads = heads if kv_heads is None else kv_heads

    def run(backend):
        qs = [_t(batch, heads, n, dim) for n in q_lens]
        ks = [_t(batch, kv_heads, n, dim) for n in kv_lens]
        vs = [_t(batch, kv_heads, n, dim) for n in kv_lens]
        extra, leaves = dict(kw), qs + ks + vs
        streams = len(q_lens)
        if kw.get("gate"):
            extra["gate"] = _t(batch, streams, streams, heads, dim)
            leaves.append(extra["gate"])
        if kw.get("bias"):
            extra["bias"] = _t(batch, streams, streams, heads)
            leaves.append(extra["bias"])
        if kw.get("kv_lengths"):
            extra["kv_lengths"] = torch.tensor([n // 2 for n in kv_lens] * batch,
                                               dtype=torch.int64).view(batch, streams)
        outs = pa.peer_attention(qs, ks, vs, backend=backend, enable_gqa=kv_heads != heads,
                                 **extra)
        return outs, leaves
    return run


def flash(q, k, **kw):
    def run(backend):
        args = [_t(*q), _t(*k), _t(*k)]
        return [pa.flash_attn_func(*args, backend=backend, **kw)], args
    return run


def varlen(q_lens, kv_lens, heads=2, **kw):
    def run(backend):
        q, k, v = _t(sum(q_lens), heads, 4), _t(sum(kv_lens), heads, 4), _t(sum(kv_lens), heads, 4)
        cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + kv_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out = pa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens, default=0),
                                        max(kv_lens, default=0), backend=backend, **kw)
        return [out], [q, k, v]
    return run


# (id, run(backend) -> (outputs, leaves), output shapes, whether no key is ever attended)
CASES = [
    ("sdpa_batch0", sdpa((0, 2, 4, 8), (0, 2, 5, 8), (0, 2, 5, 8)), [(0, 2, 4, 8)], True),
    ("sdpa_heads0", sdpa((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8)), [(2, 0, 4, 8)], True),
    ("sdpa_heads0_causal", sdpa((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8), is_causal=True),
     [(2, 0, 4, 8)], True),
    ("sdpa_heads0_bool_mask", sdpa((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8), attn_mask="bool"),
     [(2, 0, 4, 8)], True),
    ("sdpa_heads0_float_mask", sdpa((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8), attn_mask="float"),
     [(2, 0, 4, 8)], True),
    ("sdpa_heads0_dropout", sdpa((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8), dropout_p=0.3),
     [(2, 0, 4, 8)], True),
    ("sdpa_heads0_gqa", sdpa((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8), enable_gqa=True),
     [(2, 0, 4, 8)], True),
    ("sdpa_q_heads0_gqa", sdpa((2, 0, 4, 8), (2, 2, 5, 8), (2, 2, 5, 8), enable_gqa=True),
     [(2, 0, 4, 8)], True),
    ("sdpa_q_one_head_kv0", sdpa((2, 1, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8)), [(2, 0, 4, 8)], True),
    ("sdpa_3d_heads0", sdpa((0, 4, 8), (0, 5, 8), (0, 5, 8)), [(0, 4, 8)], True),
    ("sdpa_lead0", sdpa((3, 0, 2, 4, 8), (3, 0, 2, 5, 8), (3, 0, 2, 5, 8)), [(3, 0, 2, 4, 8)], True),
    ("sdpa_queries0", sdpa((2, 2, 0, 8), (2, 2, 5, 8), (2, 2, 5, 8)), [(2, 2, 0, 8)], True),
    ("sdpa_keys0", sdpa((2, 2, 4, 8), (2, 2, 0, 8), (2, 2, 0, 8)), [(2, 2, 4, 8)], True),
    ("sdpa_keys0_causal_dropout", sdpa((2, 2, 4, 8), (2, 2, 0, 8), (2, 2, 0, 8), is_causal=True,
                                       dropout_p=0.5), [(2, 2, 4, 8)], True),
    ("sdpa_head_dim0", sdpa((2, 2, 4, 0), (2, 2, 5, 0), (2, 2, 5, 8)), [(2, 2, 4, 8)], False),
    ("sdpa_value_dim0", sdpa((2, 2, 4, 8), (2, 2, 5, 8), (2, 2, 5, 0)), [(2, 2, 4, 0)], False),
    ("peer_heads0", peer((3, 2), (4, 1), heads=0, gate=True, bias=True), [(2, 0, 3, 4), (2, 0, 2, 4)],
     True),
    ("peer_batch0", peer((3, 2), (4, 1), batch=0, gate=True, kv_lengths=True),
     [(0, 2, 3, 4), (0, 2, 2, 4)], True),
    ("peer_all_streams_empty", peer((0, 0), (0, 0), normalize="peer"), [(2, 2, 0, 4)] * 2, True),
    ("peer_query_stream0", peer((3, 0), (4, 2), gate=True, bias=True),
     [(2, 2, 3, 4), (2, 2, 0, 4)], False),
    ("peer_key_stream0", peer((3, 2), (0, 2), gate=True, bias=True),
     [(2, 2, 3, 4), (2, 2, 2, 4)], False),
    ("peer_key_stream0_peer_mode", peer((3, 2), (0, 2), gate=True, normalize="peer"),
     [(2, 2, 3, 4), (2, 2, 2, 4)], False),
    ("peer_key_stream0_gqa_kv_lengths", peer((3, 2), (0, 3), heads=4, kv_heads=2,
                                             kv_lengths=True), [(2, 4, 3, 4), (2, 4, 2, 4)], False),
    ("flash_batch0", flash((0, 4, 2, 8), (0, 5, 2, 8)), [(0, 4, 2, 8)], True),
    ("flash_heads0", flash((2, 4, 0, 8), (2, 5, 0, 8), causal=True), [(2, 4, 0, 8)], True),
    ("flash_queries0", flash((2, 0, 2, 8), (2, 5, 2, 8), dropout_p=0.2), [(2, 0, 2, 8)], True),
    ("flash_keys0_causal", flash((2, 4, 2, 8), (2, 0, 2, 8), causal=True), [(2, 4, 2, 8)], True),
    ("varlen_batch0", varlen([], []), [(0, 2, 4)], True),
    ("varlen_heads0", varlen([3, 2], [4, 1], heads=0), [(5, 0, 4)], True),
    ("varlen_zero_length_sequences", varlen([0, 3, 2, 0], [2, 0, 3, 0], causal=True),
     [(5, 2, 4)], False),
]
IDS = [c[0] for c in CASES]
BY_ID = {c[0]: c for c in CASES}


def run_case(case_id: str, backend: str):
    """Forward and backward of one case: (outputs, leaves, their gradients)."""
    _, run, _, _ = BY_ID[case_id]
    outs, leaves = run(backend)
    grad_outs = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3)) for o in outs]
    grads = torch.autograd.grad(outs, leaves, grad_outs, allow_unused=True)
    return outs, leaves, grads


def _child(backend: str) -> None:
    """The child process: every case, in order, printing each id once it completed."""
    for case_id in IDS:
        print("start", case_id, flush=True)
        try:
            run_case(case_id, backend)
        except Exception as exc:  # noqa: BLE001 - a crash is what is looked for; checked in-process
            print("raised", case_id, type(exc).__name__, flush=True)
        print("done", case_id, flush=True)


@functools.lru_cache(maxsize=None)
def child_run(backend: str):
    """(returncode, ids completed, output tail) of the child process for `backend`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    code = f"import tests.test_zero_size as t; t._child({backend!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    done = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("done ")}
    return result.returncode, done, (result.stdout + result.stderr)[-3000:]


def _skip_unserved(backend: str):
    why = pa.available_backends()[backend]
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_case_kills_the_process(backend):
    _skip_unserved(backend)
    returncode, done, tail = child_run(backend)
    missing = [i for i in IDS if i not in done]
    assert returncode == 0 and not missing, (
        f"the child process died (return code {returncode}) at {missing[:1]}:\n{tail}")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", IDS)
def test_zero_size_results_and_gradients(case_id, backend):
    _skip_unserved(backend)
    if case_id not in child_run(backend)[1]:
        pytest.fail(f"{case_id} killed the child process on backend {backend!r}: not run here")
    _, _, shapes, nothing_attended = BY_ID[case_id]
    outs, leaves, grads = run_case(case_id, backend)
    assert [tuple(o.shape) for o in outs] == [tuple(s) for s in shapes]
    assert all(o.dtype == F32 for o in outs)
    for leaf, grad in zip(leaves, grads):
        grad = torch.zeros_like(leaf) if grad is None else grad
        assert grad.shape == leaf.shape and bool(torch.isfinite(grad).all())
        if nothing_attended:
            assert not grad.any()
    if nothing_attended:
        assert all(not o.any() for o in outs)
    if backend != "reference":
        want_outs, _, want_grads = run_case(case_id, "reference")
        for o, w in zip(outs, want_outs):
            _close(o, w)
        for g, w in zip(grads, want_grads):
            if g is not None and w is not None:
                _close(g, w)


@pytest.mark.parametrize("case_id", [i for i in IDS if i.startswith("sdpa_")
                                     and "heads0" not in i and "kv0" not in i and "dropout" not in i])
def test_reference_matches_torch_math_where_torch_serves(case_id):
    """Where torch's math SDPA does not die, the reference's numbers are torch's."""
    outs, leaves, grads = run_case(case_id, "reference")
    with sdpa_kernel(SDPBackend.MATH), pa.use_backend("reference"):
        _, run, _, _ = BY_ID[case_id]
        original = pa.scaled_dot_product_attention
        try:  # the same builder, with torch's function in place of ours
            pa.scaled_dot_product_attention = lambda *a, backend=None, **kw: F.scaled_dot_product_attention(*a, **kw)
            want_outs, want_leaves = run(None)
        finally:
            pa.scaled_dot_product_attention = original
    want_grads = torch.autograd.grad(
        want_outs, want_leaves,
        [torch.randn(o.shape, generator=torch.Generator().manual_seed(3)) for o in want_outs],
        allow_unused=True)
    _close(outs[0], want_outs[0])
    for g, w in zip(grads, want_grads):
        _close(torch.zeros(()) if g is None else g.sum(), torch.zeros(()) if w is None else w.sum())


def test_zero_kv_heads_under_gqa_is_a_clear_error_also_when_patched():
    """torch's kernels divide by the key/value heads (SIGFPE): never handed to torch."""
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 0, 5, 8)
    with pytest.raises(ValueError, match="key"):
        pa.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    with pa.patch_torch(), pytest.raises(ValueError, match="key"):
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="k"):
        pa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2))


def test_patched_zero_heads_under_a_transform_are_served():
    """Under torch.func transforms the patch hands calls to torch, except those it would die on."""
    q = torch.randn(3, 2, 0, 4, 8)
    with pa.patch_torch():
        out = torch.func.vmap(lambda x: F.scaled_dot_product_attention(x, x, x))(q)
    assert out.shape == (3, 2, 0, 4, 8)


def test_no_score_call_leaves_the_generator_as_torch_does():
    """torch draws no dropout mask when there is no score; neither does the package."""
    q, k = torch.randn(2, 2, 0, 8), torch.randn(2, 2, 5, 8)
    torch.manual_seed(0)
    pa.scaled_dot_product_attention(q, k, k, dropout_p=0.5)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
