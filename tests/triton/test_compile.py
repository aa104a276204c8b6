"""The interpreter runs any Python, so it cannot tell whether the kernels compile, let alone how:
run the compile report (`compile_check --arch sm90a --headline`) for sm90 with triton's own
ptxas, no GPU needed, in a process without TRITON_INTERPRET (this one has it set), and check
the structure it proves: wgmma in every matmul kernel, TMA loads in every forward, no spills."""
import json
import os
import subprocess
import sys

import pytest


# the SPEC section 9 variants and varlen must compile for real (the interpreter accepts code that
# ptxas rejects); the other feature families are in `compile_check --features` (slower)
FEATURES = "window_bottom_right_softcap_alibi_sinks,varlen_causal"


def _headline_rows():
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "peer_attention.triton_kernels.compile_check", "--arch", "sm90a",
         "--headline", "--features", FEATURES, "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_headline_compile_report_sm90():
    rows = _headline_rows()
    kernels = {(r["kernel"], r["variant"]) for r in rows}
    for variant in ("sdpa_d128_bf16", "sdpa_d128_bf16_causal"):
        for kernel in ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv"):
            assert (kernel, variant) in kernels
    assert ("fwd", "joint3_gate_bias_d128_bf16") in kernels
    for variant in FEATURES.split(","):  # compiled, forward and backward, with wgmma
        assert [r["kernel"] for r in rows if r["variant"] == variant] == [
            "fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv"]
    problems = []
    for r in rows:
        name = f"{r['kernel']} {r['variant']}"
        if r["kernel"] != "bwd_preprocess" and r["wgmma"] == 0:  # plain preprocess: no matmul
            problems.append(f"{name}: no wgmma")
        if r["kernel"] == "fwd" and r["tma_loads"] == 0:
            problems.append(f"{name}: no TMA loads")
        if r["spill_bytes"] != 0:
            problems.append(f"{name}: {r['spill_bytes']} spill bytes")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("arch, instruction", [("sm100a", "tcgen05"), ("sm120", "mma_sync"),
                                               ("sm80", "mma_sync")])
def test_sweep_compiles_for_blackwell_and_ampere(arch, instruction):
    """compile_check's sweep (the CI step's, one task) for sm_100a / sm_120 (Triton's Blackwell
    ptxas) and sm_80: bf16 dK/dV at head dim 64, the autotune-off config on tensor cores, fits,
    no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "peer_attention.triton_kernels.compile_check", "--arch", arch,
         "--autotune-off", "--families", "plain", "--dtypes", "bf16", "--dims", "64",
         "--kernels", "bwd_dkdv", "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [task] = json.loads(result.stdout.strip().splitlines()[-1])
    assert task["kept"] and not task["failures"]
    row = [r for r in task["rows"] if r["config"] == task["kept"][0]][0]
    assert row[instruction] > 0 and row["spill_bytes"] == 0 and row["fits"], row
