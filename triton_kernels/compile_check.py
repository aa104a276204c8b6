"""Compile the kernels for GPU targets without a GPU (ptxas ships with triton): catches code that
only the real compiler rejects (the interpreter runs anything Python can). Run as
`python -m peer_attention.triton_kernels.compile_check [--quick] [80 90]` with TRITON_INTERPRET unset."""
from __future__ import annotations

import itertools
import sys

POINTER_DTYPE = {"Mask": "*u8", "Lse": "*fp32", "Delta": "*fp32", "DGatePart": "*fp32",
                 "DBiasPart": "*fp32", "QOff": "*i32", "KVOff": "*i32", "Peers": "*i32",
                 "KVLen": "*i64", "Keep": "*u8"}
INT64_ARGS = {"seed", "rng_offset"}
FLOAT_ARGS = {"dropout_p", "scale_log2", "scale"}
INT_ARGS = {"E", "EV", "Tq", "Tk", "TUNE_LEN"}


def _signature(fn, constexprs, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper() and name not in INT_ARGS:
            sig[name] = POINTER_DTYPE.get(name, "*" + dtype)
        elif name in INT64_ARGS:
            sig[name] = "i64"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_all(archs=(80, 90), quick=False, verbose=True):
    """Compile every kernel for each arch (quick: two feature variants instead of all)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import bwd, fwd, tiles
    from .utils import INTERPRET

    if INTERPRET:
        raise SystemExit("compile_check: unset TRITON_INTERPRET (it replaces the compiler)")
    base = dict(HAS_GATE=True, HAS_BIAS=True, HAS_KVLEN=True, MASK_KIND=0, IS_CAUSAL=True,
                PEER_MODE=False, HAS_DROPOUT=False, F32_DOT=False, BF16_RTNE=False,
                E_PAD=128, EV_PAD=64, BLOCK_M=64, BLOCK_N=64)
    variants = []
    for peer_mode, mask_kind, dropout in itertools.product((False, True), (0, 1, 2), (False, True)):
        if peer_mode and (mask_kind or dropout):
            continue
        variants.append(dict(base, PEER_MODE=peer_mode, MASK_KIND=mask_kind, HAS_DROPOUT=dropout))
    variants.append(dict(base, F32_DOT=True, E_PAD=256, EV_PAD=256, BLOCK_M=32, BLOCK_N=32))
    if quick:  # every joint feature at once, and the peer mode
        variants = [dict(base, MASK_KIND=2, HAS_DROPOUT=True), dict(base, PEER_MODE=True)]
    kernels = [
        (fwd._attn_fwd, {}),
        (bwd._bwd_preprocess, dict(NEED_DGATE=True, EXACT_DELTA=True)),
        (bwd._bwd_dq, dict(NEED_DQ=True, NEED_DBIAS=True, NEED_DMASK=True)),
        (bwd._bwd_dkdv, {}),
    ]
    count = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for flags in variants:
            dtype = "fp32" if flags["F32_DOT"] else "bf16"
            for fn, extra in kernels:
                constexprs = dict(flags, **extra)
                constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
                src = triton.compiler.ASTSource(fn, _signature(fn, constexprs, dtype), constexprs)
                triton.compile(src, target=target, options=dict(num_warps=4, num_stages=2))
                count += 1
        keep = dict(BLOCK_M=64, BLOCK_N=64)
        triton.compile(triton.compiler.ASTSource(tiles.keep_mask_kernel,
                                                 _signature(tiles.keep_mask_kernel, keep, "fp32"),
                                                 keep), target=target)
        count += 1
        if verbose:
            print(f"sm{arch}: compiled", flush=True)
    return count


if __name__ == "__main__":
    args = sys.argv[1:]
    quick = "--quick" in args
    archs = tuple(int(a) for a in args if a != "--quick") or (80, 90)
    print(f"compiled {compile_all(archs, quick=quick)} kernel variants for sm{archs}")
