"""The CPU-testable pieces of scripts/gpu_check.sh: its arguments, the steps it runs (a dry run),
the results folder's name and the summary table (from synthetic logs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_report as report  # noqa: E402


def run_script(*args, **env):
    full_env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


def test_usage_and_bad_arguments():
    assert run_script("--help").returncode == 0
    assert "compute-sanitizer" in run_script("--help").stdout
    for bad in ([], ["tests"], ["test", "--bogus"]):
        done = run_script(*bad)
        assert done.returncode == 2, bad
        assert "test, sanitize, bench" in done.stderr


def test_all_runs_every_step_in_order_with_autotune_off_except_the_bench(tmp_path):
    done = run_script("all", OUT=str(tmp_path))
    assert done.returncode == 0, done.stderr
    steps = [line.split(" (")[0].removeprefix("[dry run] ")
             for line in done.stdout.splitlines() if line.startswith("[dry run]")]
    tools = [f"sanitize {t}" for t in ("memcheck", "racecheck", "synccheck", "initcheck")]
    assert steps == ["build", "tests"] + tools + ["bench headline"]
    lines = {line.split(" (")[0].removeprefix("[dry run] "): line
             for line in done.stdout.splitlines() if line.startswith("[dry run]")}
    assert "(autotune=0)" in lines["tests"] and "--junitxml" in lines["tests"]
    assert lines["tests"].rstrip().endswith(" tests")  # the whole suite
    assert "(autotune=1)" in lines["bench headline"] and "--preset headline" in lines["bench headline"]
    assert "--tool racecheck" in lines["sanitize racecheck"]
    assert "scripts/sanitize_workload.py --backend all" in lines["sanitize initcheck"]
    assert "PEER_ATTENTION_BUILD_CUDA" not in lines["build"] and "--no-index" in lines["build"]
    # the results land in $OUT with the summary table last
    assert (tmp_path / "env.txt").exists() and (tmp_path / "summary.txt").exists()
    assert done.stdout.rstrip().splitlines()[-1].startswith("bench headline")


def test_one_command_builds_once(tmp_path):
    done = run_script("test", "sanitize", OUT=str(tmp_path))
    assert [l for l in done.stdout.splitlines() if l.startswith("[dry run] build")] != []
    assert sum(l.startswith("[dry run] build") for l in done.stdout.splitlines()) == 1


def test_results_folder_name():
    assert report.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert report.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert report.gpu_slug("") == "unknown-gpu"
    assert report.results_name("NVIDIA H200", "0123456789abcdef", "2026-11-21") == \
        "2026-11-21_h200_0123456789ab"
    assert report.results_name("NVIDIA H200", "abc/../x", "2026-11-21") == "2026-11-21_h200_abcx"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1"
failures="2" skipped="3" tests="10" time="12.0"><testcase classname="tests.gpu.test_spec_scale"
name="test_sdpa[triton-L4096]"><failure message="x"/></testcase><testcase classname="tests.cuda.t"
name="test_b"><failure message="y"/></testcase><testcase classname="tests.t" name="test_c">
<error message="z"/></testcase><testcase classname="tests.t" name="test_ok"/></testsuite></testsuites>"""

CSV_HEADER = ("suite,case_id,family,kind,head_dim,mode,is_causal,mask,seq_len,provider,package,"
              "status,correct,tflops\n")


def test_summary_table(tmp_path):
    (tmp_path / "steps.tsv").write_text(
        "build\t0\t140\t\ntests\t1\t250\t\nsanitize memcheck\t0\t30\t\n"
        "sanitize racecheck\t124\t45\t\nbench headline\tskip\t0\tno time left\n")
    (tmp_path / "junit_tests.xml").write_text(JUNIT)
    (tmp_path / "sanitize_memcheck.log").write_text(
        "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.csv").write_text(
        CSV_HEADER
        + "headline,c1,E=128,sdpa,128,fwd,False,,16384,pa.triton,True,ok,True,450\n"
        + "headline,c1,E=128,sdpa,128,fwd,False,,16384,torch.cudnn,False,ok,True,600\n"
        + "headline,c1,E=128,sdpa,128,fwd,False,,16384,torch.flash,False,ok,False,900\n"
        + "headline,c0,E=128,sdpa,128,fwd,False,,1024,pa.triton,True,ok,True,100\n")
    text = report.summary(tmp_path)
    lines = text.splitlines()
    assert lines[0].split() == ["step", "status", "time", "details"]
    by_step = {l.split("  ")[0]: l for l in lines[1:]}
    assert "ok" in by_step["build"] and "140 s" in by_step["build"]
    assert "FAILED (1)" in by_step["tests"]
    assert "4 passed, 2 failed, 1 errors, 3 skipped" in by_step["tests"]
    assert "test_sdpa[triton-L4096]" in by_step["tests"]
    assert "ERROR SUMMARY: 0 errors" in by_step["sanitize memcheck"]
    assert "TIMEOUT" in by_step["sanitize racecheck"] and "no log" in by_step["sanitize racecheck"]
    bench = by_step["bench headline"]
    assert "skipped" in bench and "no time left" in bench
    assert "4 rows, 4 timed, 1 failed the reference check" in bench
    # the fastest CORRECT provider outside the package at the longest length
    assert "pa.triton E=128 L=16384 fwd 450 TFLOP/s = 0.75x torch.cudnn (600)" in bench


def test_summary_command_writes_the_file(tmp_path):
    (tmp_path / "steps.tsv").write_text("build\t2\t5\t\n")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_report.py"), "summary",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and "FAILED (2)" in done.stdout
    assert (tmp_path / "summary.txt").read_text() == done.stdout


def test_sanitize_workload_lists_every_cuda_kernel():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanitize_workload.py"), "--list"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for head_dim in (32, 64, 96, 128, 256):  # every kernel instantiation: head dim x dtype
        for dtype in ("float16", "bfloat16"):
            assert any(l.startswith("cuda ") and f"E={head_dim} " in l and dtype in l for l in lines)
    for feature in ("peer-per-peer-gate-kvlen", "sdpa-float-mask-grad", "bottom-right-causal"):
        assert any(feature in l for l in lines)
    assert any(l.startswith("triton ") for l in lines)


def test_autotune_switch_keeps_one_config(monkeypatch):
    """PEER_ATTENTION_TRITON_AUTOTUNE=0 (set by gpu_check.sh test): the pruner keeps one config
    that fits the device; unset, it keeps every fitting candidate (as on a GPU, faked here)."""
    import torch
    from peer_attention.triton_kernels import configs

    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "_arch_and_smem", lambda index: (90, 227 * 1024))
    q = torch.empty(1, 1, 1, 128, dtype=torch.float16)
    for kind in configs.KINDS:
        candidates = configs.autotune_configs(kind)
        prune = configs.make_pruner(kind)
        monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
        tuned = prune(candidates, {"Q": q}, E_PAD=128, EV_PAD=128)
        assert len(tuned) > 1
        monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
        assert prune(candidates, {"Q": q}, E_PAD=128, EV_PAD=128) == tuned[:1]


def test_sanitize_workload_calls_run_and_compare(monkeypatch):
    """The workload's own logic (inputs, calls, the comparison with the float32 reference) on the
    CPU: served by the reference backend, every feature agrees; a wrong kernel is caught."""
    import torch

    import sanitize_workload as workload

    monkeypatch.setattr(workload, "DEVICE", "cpu")
    calls = dict(workload.feature_calls("reference"))
    for name in ("sdpa-causal-ragged", "sdpa-float-mask-grad", "peer-per-peer-gate-kvlen",
                 "peer-joint-causal-sparse"):
        assert calls[name](torch.float32, 16) < 1e-4, name
    import peer_attention as pa
    real = pa.scaled_dot_product_attention
    monkeypatch.setattr(pa, "scaled_dot_product_attention", lambda *a, **kw: real(*a, **kw) * 1.5)
    assert calls["sdpa-gqa"](torch.float32, 16) > 0.1


def test_sanitize_workload_decode_calls(monkeypatch):
    """The workload's split-KV decode calls (Triton under the interpreter here) agree with the
    reference: the route of a decode-shaped SDPA and flash_attn_with_kvcache, paged and not."""
    import torch

    import sanitize_workload as workload

    monkeypatch.setattr(workload, "DEVICE", "cpu")
    calls = dict(workload.feature_calls("triton"))
    for name in ("kvcache-paged-append-splits", "kvcache-contiguous-auto"):
        assert calls[name](torch.float32, 16) < 1e-4, name
