"""A small workload for compute-sanitizer (memcheck, racecheck, synccheck, initcheck): every
CUDA kernel of peer_attention._C (forward, dQ and dK/dV for each head dim and both 16-bit dtypes,
the delta preprocess) and the Triton kernels, forward and backward, with each feature. Shapes are
tiny (partial tiles, several tiles, several streams) because the sanitizers slow launches by 10-100x.

    python scripts/sanitize_workload.py --backend cuda|triton|all [--list]

Each call is checked against the reference in float32 (loosely: the sanitizer looks for memory
and synchronisation errors; tests/gpu checks the numbers); the exit status is 1 when a call
raises or disagrees, so a run also fails on wrong results.
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the headline head dim first: a run cut short by its time box has checked it
HEAD_DIMS = {"cuda": (128, 64, 256, 32, 96, 160, 192), "triton": (128, 64)}
DEVICE = "cuda"  # the tests run the workload's logic on the CPU with the reference backend
DTYPES = (torch.float16, torch.bfloat16)
# calls that exist for the kernels of some head dims only: the CUDA forward's gate-alone and
# bias-alone switches (forward_plain.cuh) up to 128; above it the general kernel that the gate +
# bias call already covers
MAX_HEAD_DIM = {"peer-joint-gate-kvlen": 128, "peer-joint-bias-kvlen": 128}


def head_dims(backend: str, name: str):
    return [d for d in HEAD_DIMS[backend] if d <= MAX_HEAD_DIM.get(name, d)]


def feature_calls(backend: str):
    """(name, fn(dtype, head_dim)) pairs; each fn runs forward + backward and returns the
    largest gap to the reference (float32) over outputs and gradients."""
    import peer_attention as pa
    from peer_attention import dispatch
    from peer_attention.problem import AttentionProblem

    def rand(*shape, dtype):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()

    def compare(fn, reference, inputs):
        outs = fn(*inputs)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        grads = torch.autograd.grad(sum(o.float().sum() for o in outs), inputs)
        f32 = [t.detach().float().requires_grad_() for t in inputs]
        ref = reference(*f32)
        ref = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        ref_grads = torch.autograd.grad(sum(o.sum() for o in ref), f32)
        return max((a.float() - b).abs().max().item() for a, b in
                   zip(outs + list(grads), ref + list(ref_grads)) if a.numel())

    def sdpa(L, M, causal=False, gqa=False, mask=None):
        def run(dtype, E):
            q = rand(2, 4, L, E, dtype=dtype)
            k, v = (rand(2, 2 if gqa else 4, M, E, dtype=dtype) for _ in range(2))
            inputs = [q, k, v]
            if mask == "float":
                inputs.append(rand(1, 1, L, M, dtype=dtype))
            keep = None
            if mask == "bool":
                keep = torch.rand(2, 1, L, M, device=DEVICE) > 0.3

            def call(impl):
                def f(q, k, v, *m):
                    return impl(q, k, v, attn_mask=m[0] if m else keep, is_causal=causal,
                                enable_gqa=gqa)
                return f
            ours = call(lambda *a, **kw: pa.scaled_dot_product_attention(*a, backend=backend, **kw))
            return compare(ours, call(torch.nn.functional.scaled_dot_product_attention), inputs)
        return run

    def peer(normalize, lens=(70, 33, 129), with_gate=True, with_bias=None, **opts):
        def run(dtype, E):
            S = len(lens)
            qs = [rand(2, 2, n, E, dtype=dtype) for n in lens]
            ks = [rand(2, 2, n, E, dtype=dtype) for n in lens]
            vs = [rand(2, 2, n, E, dtype=dtype) for n in lens]
            gate = (torch.rand(2, S, S, 2, E, device=DEVICE) + 0.5).requires_grad_() \
                if with_gate else None
            # a bias cancels in a per-peer softmax: the API takes it in joint mode only
            bias_on = normalize == "joint" if with_bias is None else with_bias
            bias = torch.randn(1, S, S, 2, device=DEVICE).requires_grad_() if bias_on else None
            # batch 0: a full, a half and an empty key stream; batch 1: a third, then full
            kv_lengths = torch.tensor([[lens[0], lens[1] // 2, 0], [lens[0] // 3, lens[1], lens[2]]],
                                      device=DEVICE)[:, :S]

            def call(b):
                def f(*args):
                    q, k, v, rest = args[:S], args[S:2 * S], args[2 * S:3 * S], args[3 * S:]
                    g = rest[0] if with_gate else None
                    bi = rest[-1] if bias_on else None
                    return pa.peer_attention(q, k, v, gate=g, bias=bi, normalize=normalize,
                                             kv_lengths=kv_lengths, backend=b, **opts)
                return f
            extra = [t for t in (gate, bias) if t is not None]
            return compare(call(backend), call("reference"), qs + ks + vs + extra)
        return run

    def bottom_right(L, M):
        def run(dtype, E):
            q = rand(1, 2, L, E, dtype=dtype)
            k, v = rand(1, 2, M, E, dtype=dtype), rand(1, 2, M, E, dtype=dtype)

            def call(b):
                def f(q, k, v):
                    problem = AttentionProblem(
                        q=q, k=k, v=v, q_lens=(L,), kv_lens=(M,), peers=(1,), gate=None,
                        bias=None, kv_lengths=None, attn_mask=None, dropout_seed=None,
                        dropout_p=0.0, is_causal=True, scale=1 / math.sqrt(E), normalize="joint",
                        bottom_right=True)
                    return dispatch.forward_op(b)(*problem)[0]
                return f
            return compare(call(backend), call("reference"), [q, k, v])
        return run

    def kvcache(page_size, splits):
        def run(dtype, E):  # inference only: the output's gap (no gradients)
            B, H, Hq, capacity = 3, 2, 8, 320
            lens = torch.tensor([5, 170, 317], dtype=torch.int32, device=DEVICE)
            q = torch.randn(B, 2, Hq, E, device=DEVICE, dtype=dtype)
            k_new, v_new = (torch.randn(B, 2, H, E, device=DEVICE, dtype=dtype) for _ in range(2))
            if page_size is None:
                shape, table = (B, capacity, H, E), None
            else:
                blocks = capacity // page_size
                shape = (B * blocks + 2, page_size, H, E)
                table = torch.randperm(B * blocks, device=DEVICE).view(B, blocks).int()
            k_cache = torch.randn(shape, device=DEVICE, dtype=dtype)
            v_cache = torch.randn(shape, device=DEVICE, dtype=dtype)
            outs = []
            for b, n in ((backend, splits), ("reference", 0)):
                outs.append(pa.flash_attn_with_kvcache(
                    q, k_cache.clone(), v_cache.clone(), k_new, v_new, cache_seqlens=lens,
                    block_table=table, causal=True, num_splits=n, backend=b).float())
            return (outs[0] - outs[1]).abs().max().item()
        return run

    calls = [
        ("sdpa", sdpa(70, 70)),
        ("sdpa-causal-ragged", sdpa(130, 65, causal=True)),
        ("sdpa-gqa", sdpa(64, 100, gqa=True)),
        ("sdpa-bool-mask", sdpa(40, 90, mask="bool")),
        ("sdpa-float-mask-grad", sdpa(40, 90, mask="float")),
        ("peer-joint-gate-bias-kvlen", peer("joint")),
        ("peer-per-peer-gate-kvlen", peer("peer")),
        ("peer-joint-causal-sparse", peer("joint", is_causal=True,
                                          peers=[[1, 1, 0], [0, 1, 1], [1, 0, 1]])),
    ]
    if backend == "cuda":
        calls.append(("bottom-right-causal", bottom_right(50, 130)))
        # the forward's switch instantiations beside gate + bias: the gate alone (V scaled in
        # shared memory behind its own barrier), the bias alone
        calls.append(("peer-joint-gate-kvlen", peer("joint", with_bias=False)))
        calls.append(("peer-joint-bias-kvlen", peer("joint", with_gate=False)))
    if backend == "triton":  # the split-KV decode kernels: the drop-in's route and the KV cache
        calls.append(("sdpa-decode-route", sdpa(4, 300, gqa=True)))
        calls.append(("kvcache-paged-append-splits", kvcache(page_size=16, splits=3)))
        calls.append(("kvcache-contiguous-auto", kvcache(page_size=None, splits=0)))
    return calls


def dtypes_for(feature_index: int, all_dtypes: bool):
    """Both dtypes, or one per feature, alternating: every (head dim, dtype) kernel instantiation
    still runs several times, at half the sanitizer time."""
    return DTYPES if all_dtypes else (DTYPES[feature_index % 2],)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("cuda", "triton", "all"), default="all")
    parser.add_argument("--list", action="store_true", help="print the calls, run nothing")
    parser.add_argument("--all-dtypes", action="store_true",
                        help="every feature in both dtypes (default: alternate per feature)")
    parser.add_argument("--tolerance", type=float, default=0.25,
                        help="largest accepted max-abs gap to the float32 reference")
    args = parser.parse_args(argv)
    backends = ("cuda", "triton") if args.backend == "all" else (args.backend,)
    if args.list:
        for b in backends:
            for index, (name, _) in enumerate(feature_calls(b)):
                dtypes = ",".join(str(t)[6:] for t in dtypes_for(index, args.all_dtypes))
                for d in head_dims(b, name):
                    print(f"{b} {name} E={d} {dtypes}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device is visible", file=sys.stderr)
        return 2
    import peer_attention as pa

    failures = 0
    for backend in backends:
        why = pa.available_backends()[backend]
        if why:
            print(f"{backend}: unavailable ({why})")
            failures += 1
            continue
        for index, (name, fn) in enumerate(feature_calls(backend)):
            for head_dim in head_dims(backend, name):
                for dtype in dtypes_for(index, args.all_dtypes):
                    label = f"{backend} {name} E={head_dim} {str(dtype)[6:]}"
                    try:
                        gap = fn(dtype, head_dim)
                        torch.cuda.synchronize()
                    except Exception:  # report and go on: the sanitizer log says the rest
                        print(f"FAIL {label}\n{traceback.format_exc()}", flush=True)
                        failures += 1
                        continue
                    status = "ok" if gap <= args.tolerance else "WRONG"
                    failures += status != "ok"
                    print(f"{status} {label} max abs gap {gap:.3g}", flush=True)
    print(f"sanitize workload: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
