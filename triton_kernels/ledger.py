"""The compile ledger: what compile_check measured for every candidate config on an architecture,
one row per compile, keyed by Triton's own compile cache key.

The full sweep (every kernel x dtype x head dim x family x candidate: about 3,000 compiles per
architecture) takes hours on CI's two cores, so CI checks it from the ledger: a row stands for a
compile exactly when Triton itself would reuse that compile's cached binary (the key covers the
kernel's source and the functions and constexpr globals it uses, its line number, the launch's
specialisation and constants, the compile options, Triton's version and the ptxas version). Change
a kernel, a candidate or the pinned Triton and its rows no longer match: CI reports those tasks
uncovered until the ledger is refreshed by compiling them
(`compile_check --arch A --ledger DIR --update-ledger`). CI also compiles a sample of tasks for
real and fails where a compile differs from its ledger row.

One tab-separated file per architecture (`sm90.tsv`), sorted, one row per key; rows record only
compiles that succeeded (a failure is compiled and reported again every time).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Dict

# what a row records of a compile (compile_check.analyse without its SASS loops)
FIELDS = ("shared", "tmem", "trap", "registers", "spill_bytes", "wgmma", "tcgen05", "mma_sync",
          "tma_loads")
COLUMNS = ("key", "family", "dtype", "dim", "kernel", "config") + FIELDS
KEY_HEX = 32  # 128 bits of Triton's sha256 key


def canonical_kernel_hashes():
    """Hash the kernels in one fixed order, once per process, before any key is computed.

    Triton computes a kernel's source hash (JITFunction.cache_key) the first time it is needed
    and keeps it, and with Triton 3.6 the result depends on which kernel was hashed first in
    the process: hashed after _attn_fwd, the shared helpers tiles.log2_scores and
    probs_from_lse, and so every kernel's key, come out different from their values when a
    backward kernel comes first (measured: both orders are stable, each gives its own keys). A
    fixed order makes a key the same in every process."""
    from . import bwd, fwd

    order = bwd.KERNELS + fwd.KERNELS
    hashed = [k.hash is not None for k in order]
    if any(hashed) and not hashed[0]:
        raise RuntimeError("ledger keys must be computed before anything hashes a kernel in this "
                           "process (a compile or launch does): keys depend on Triton's hashing "
                           "order")
    for kernel in order:
        kernel.cache_key


def launch_key(fn, args, kwargs, config, arch: int) -> str:
    """Triton's compile cache key of `fn[grid](*args, **kwargs, **config)` on `arch`
    (fit.compile_launch's compile), computed without compiling, with the kernels hashed in
    canonical_kernel_hashes' order."""
    from triton.compiler import make_backend
    from triton.compiler.compiler import get_cache_invalidating_env_vars, get_cache_key

    from .fit import launch_source, target

    canonical_kernel_hashes()
    backend = make_backend(target(arch))
    src, options = launch_source(fn, args, kwargs, config, backend)
    key = get_cache_key(src, backend, backend.parse_options(options),
                        env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:KEY_HEX]


def path(directory: str, arch: int) -> str:
    return os.path.join(directory, f"sm{arch}.tsv")


def _value(name: str, text: str):
    if name in ("family", "dtype", "kernel", "config", "key"):
        return text
    if name == "trap":
        return text == "1"
    return int(text)


@functools.lru_cache(maxsize=None)
def _load(file: str, mtime: float) -> Dict[str, dict]:
    rows = {}
    with open(file) as f:
        header = f.readline().rstrip("\n").split("\t")
        if tuple(header) != COLUMNS:
            raise ValueError(f"{file}: expected the columns {COLUMNS}, found {header}")
        for line in f:
            row = {k: _value(k, v) for k, v in zip(COLUMNS, line.rstrip("\n").split("\t"))}
            rows[row["key"]] = row
    return rows


def load(directory: str, arch: int) -> Dict[str, dict]:
    """key -> row of the architecture's ledger ({} where it has none)."""
    file = path(directory, arch)
    if not os.path.exists(file):
        return {}
    return _load(file, os.path.getmtime(file))


def row_of(key: str, task, config_name: str, analysed: dict) -> dict:
    _, family, dtype, dim, kernel = task
    return dict(key=key, family=family, dtype=dtype, dim=dim, kernel=kernel, config=config_name,
                **{k: analysed[k] for k in FIELDS})


def differences(recorded: dict, analysed: dict) -> Dict[str, tuple]:
    """field -> (ledger, compiled) where a compile disagrees with its row."""
    return {k: (recorded[k], analysed[k]) for k in FIELDS if recorded[k] != analysed[k]}


def save(directory: str, arch: int, rows: Dict[str, dict]) -> str:
    """Write the architecture's ledger (rows: key -> row), sorted by task and config."""
    os.makedirs(directory, exist_ok=True)
    file = path(directory, arch)
    order = sorted(rows.values(), key=lambda r: (r["family"], r["dtype"], r["dim"], r["kernel"],
                                                 r["config"], r["key"]))
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        f.write("\t".join(COLUMNS) + "\n")
        for r in order:
            f.write("\t".join(str(int(r[k]) if k == "trap" else r[k]) for k in COLUMNS) + "\n")
    os.replace(tmp, file)
    return file
