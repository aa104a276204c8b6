"""What a compiled kernel really uses, and whether it fits a device: the exact check behind the
pruner (on the launching device) and the compile report (for every architecture, no GPU).

A launch is compiled exactly as `fn[grid](*args, **kwargs, **config)` would compile it (Triton's
binder and argument packer, so the stride-1 / divisible-by-16 specialisation is a real
launch's), then read from Triton's metadata: shared memory in bytes, tensor-memory columns
(sm_100) and whether the kernel body traps (Triton emits `trap;` where tensor memory cannot be
allocated).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Optional

# the opt-in shared memory per block (bytes) of each architecture SPEC section 13 serves
SMEM_OPTIN = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
ARCHS = tuple(SMEM_OPTIN)
MIN_ARCH = 80  # below: bf16/fp16 dots compile to FMA loops with a stack (no tensor-core path)
TMEM_COLUMNS = 512  # tensor memory per SM on sm_100 (columns of 128 lanes x 32 bit)


def target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def bind(fn, args, kwargs, config, backend):
    """(signature, constexprs, attrs, options) of `fn[grid](*args, **kwargs, **config)` on
    `backend`'s target, exactly as a launch binds them (Triton's binder and argument packer, so
    the stride == 1 / divisible-by-16 specialisation, tuple arguments included, is a real
    launch's)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args,
                                                          specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(fn, args, kwargs, config, gpu_target):
    """Compile JITFunction `fn` for `gpu_target` as `fn[grid](*args, **kwargs, **config)`
    would on that device (bind); Triton's cache makes a second compile of the same launch (the
    launch itself) a lookup."""
    import triton
    from triton.compiler import make_backend

    src, options = launch_source(fn, args, kwargs, config, make_backend(gpu_target))
    return triton.compile(src, target=gpu_target, options=options)


def launch_source(fn, args, kwargs, config, backend):
    """(ASTSource, options dict) that triton.compile gets for that launch on `backend`'s target
    (compile_launch; ledger.launch_key hashes them as Triton's cache does)."""
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = bind(fn, args, kwargs, config, backend)
    return ASTSource(fn, signature, constexprs, attrs), dict(options.__dict__)


_TRAP = re.compile(r"^\s*trap;", re.MULTILINE)


def usage(compiled) -> dict:
    """shared (bytes), tmem (columns, 0 off sm_100) and trap (the body traps) of a compiled
    kernel."""
    meta = compiled.metadata
    return dict(shared=int(meta.shared), tmem=int(getattr(meta, "tmem_size", 0) or 0),
                trap=bool(_TRAP.search(compiled.asm["ptx"])))


def misfit(use: dict, smem_limit: int) -> Optional[str]:
    """Why a kernel with this usage cannot run on a device with `smem_limit` bytes of shared
    memory per block (None: it fits)."""
    if use.get("error"):
        return use["error"]
    if use["trap"]:
        return "its body traps (tensor memory could not be allocated)"
    if use["shared"] > smem_limit:
        return f"{use['shared']} B of shared memory > {smem_limit}"
    if use["tmem"] > TMEM_COLUMNS:
        return f"{use['tmem']} tensor-memory columns > {TMEM_COLUMNS}"
    return None


def ptxas_resources(compiled, arch: int):
    """(registers, spill bytes: stores + loads) of a compiled kernel, from `ptxas -v` run again
    on its PTX by the architecture's bundled ptxas (Triton keeps neither; the loader's n_spills
    is the whole stack frame, which can be non-zero without a spill)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v",
                              f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o",
                              os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) + int(spills.group(2)) if spills else -1)
