"""The compile ledger (triton_kernels/ledger.py) that lets CI check every candidate config of
every architecture without compiling them all: its key is Triton's own compile cache key, a
sampled compile that disagrees with its row fails, a task checked from the ledger alone is judged
by the same rules as a compiled one, and a task the ledger does not cover fails when it must be
covered. Compiles run in a process without TRITON_INTERPRET (this one has it set)."""
import json
import os
import subprocess
import sys

import pytest

from peer_attention.triton_kernels import ledger

# one cheap task per run: the preprocess kernel (elementwise) at head dim 16 on sm_80, which
# takes the forward's 10 candidates
TASK = ["--arch", "sm80", "--families", "plain", "--dtypes", "fp16", "--dims", "16"]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _compile_check(*args):
    result = subprocess.run(
        [sys.executable, "-m", "peer_attention.triton_kernels.compile_check", *TASK, *args],
        env=ENV, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def _edit(directory, change):
    rows = dict(ledger.load(str(directory), 80))
    for row in rows.values():
        change(row)
    ledger.save(str(directory), 80, rows)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A ledger of the preprocess task's candidates, written by compile_check itself."""
    directory = tmp_path_factory.mktemp("ledger")
    rc, out = _compile_check("--kernels", "bwd_preprocess", "--ledger", str(directory),
                             "--update-ledger")
    assert rc == 0, out[-3000:]
    return directory


def test_rows_record_every_candidate(recorded):
    from peer_attention.triton_kernels.configs import candidates

    rows = ledger.load(str(recorded), 80)
    assert len(rows) == len(candidates(80, "fwd")) > 1
    assert {(r["family"], r["dtype"], r["dim"], r["kernel"]) for r in rows.values()} == {
        ("plain", "fp16", 16, "bwd_preprocess")}
    assert all(r["shared"] > 0 and r["registers"] > 0 and not r["trap"] for r in rows.values())


def test_key_is_tritons_compile_hash(recorded):
    """launch_key without compiling == the hash of the compile Triton caches (so a row is reused
    exactly when Triton would reuse the binary)."""
    code = """
import json
from peer_attention.triton_kernels import compile_check as cc, ledger
from peer_attention.triton_kernels.configs import make_config, candidates
problem = cc.family_problem("plain", "fp16", 16)
[(_, fn, args, kwargs)] = [x for x in cc.kernel_launches(problem, True, 80) if x[0] == "bwd_preprocess"]
config = make_config(*candidates(80, "fwd")[0])
key = ledger.launch_key(fn, args, kwargs, config, 80)
compiled = cc.faithful_compile(fn, args, kwargs, config, 80)
print(json.dumps([key, compiled.hash]))
"""
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    key, compiled_hash = json.loads(result.stdout.strip().splitlines()[-1])
    assert compiled_hash.startswith(key) and len(key) == ledger.KEY_HEX
    assert key in ledger.load(str(recorded), 80)

    # Triton's kernel hash depends on which kernel a process hashes first: a key asked for
    # after a compile hashed the kernels in another order is refused, not silently different
    swapped = code.replace("key = ledger.launch_key(fn, args, kwargs, config, 80)\n", "").replace(
        "print(json.dumps([key,", "print(json.dumps([ledger.launch_key(fn, args, kwargs, config, 80),")
    result = subprocess.run([sys.executable, "-c", swapped], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1 and "hashing order" in result.stderr, result.stderr[-3000:]


def test_sampled_compile_that_differs_from_its_row_fails(recorded, tmp_path):
    ledger.save(str(tmp_path), 80, dict(ledger.load(str(recorded), 80)))
    rc, out = _compile_check("--kernels", "bwd_preprocess", "--ledger", str(tmp_path),
                             "--sample", "1")
    assert rc == 0, out[-3000:]
    assert "10 checked against the ledger" in out, out

    def off_by_one(row):
        row["registers"] += 1

    _edit(tmp_path, off_by_one)
    rc, out = _compile_check("--kernels", "bwd_preprocess", "--ledger", str(tmp_path),
                             "--sample", "1")
    assert rc == 1 and "differs from its ledger row" in out and "'registers'" in out, out


def test_ledger_rows_are_judged_like_compiles(recorded, tmp_path):
    """Checked from the ledger alone (not sampled, not compiled), a task whose every config
    spills fails as a compiled one would, and one whose configs overflow shared memory finds
    nothing that fits."""
    ledger.save(str(tmp_path), 80, dict(ledger.load(str(recorded), 80)))
    # --sample 0: no task compiled, each checked from the ledger alone
    args = ("--kernels", "bwd_preprocess", "--ledger", str(tmp_path), "--sample", "0")
    rc, out = _compile_check(*args)
    assert rc == 0 and "compiled 0 kernels" in out, out

    def spill(row):
        row["spill_bytes"] = 64

    _edit(tmp_path, spill)
    rc, out = _compile_check(*args)
    assert rc == 1 and "FAIL" in out and "spills 64 B" in out, out

    def overflow(row):
        row["spill_bytes"], row["shared"] = 0, 1 << 20

    _edit(tmp_path, overflow)
    rc, out = _compile_check(*args)
    assert rc == 1 and "no config fits" in out, out


def test_uncovered_task_fails_only_when_required(recorded):
    args = ("--kernels", "bwd_preprocess,fwd", "--ledger", str(recorded), "--sample", "0")
    rc, out = _compile_check(*args)
    assert rc == 0 and "uncovered sm80 fwd plain fp16 hd16" in out and "1 tasks uncovered" in out
    rc, out = _compile_check(*args, "--require-ledger")
    assert rc == 1 and "--update-ledger" in out, out


def test_save_load_round_trip(tmp_path):
    row = dict(key="0" * ledger.KEY_HEX, family="peer", dtype="bf16", dim=128, kernel="bwd_dq",
               config="64x32 w8 s2", shared=73728, tmem=0, trap=True, registers=220,
               spill_bytes=0, wgmma=68, tcgen05=0, mma_sync=0, tma_loads=2)
    ledger.save(str(tmp_path), 90, {row["key"]: row})
    assert ledger.load(str(tmp_path), 90) == {row["key"]: row}
    assert ledger.load(str(tmp_path), 80) == {}
    with open(ledger.path(str(tmp_path), 90), "w") as f:
        f.write("key\tconfig\n")
    with pytest.raises(ValueError, match="columns"):
        ledger.load(str(tmp_path), 90)
