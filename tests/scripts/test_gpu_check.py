"""The CPU-testable pieces of scripts/gpu_check.sh: the plan and its 8-minute budget (a dry run),
the orchestration with every step faked (GPU_CHECK_FAKE=1: parallel steps, time boxes, failures,
the files left for a lent machine to return), the summary, NOTES.md and auto's order from
synthetic results, and the sanitizer workload's logic on the CPU. About 20 s."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_report as report  # noqa: E402

BUDGET_S = 480  # the device call's limit: 8 minutes
REQUIRED = {"env", "build", "triton-suite", "triton-autotune", "memcheck-triton", "racecheck-triton",
            "cuda-tests", "memcheck-cuda", "racecheck-cuda", "bench", "decode"}


def run_script(*args, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    full_env.update(PYTHON=sys.executable, TMPDIR=os.environ.get("TMPDIR", "/tmp"), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


def plan_rows(stdout):
    """{step: (box, worst-case end)} from the dry run's table."""
    rows = {}
    for line in stdout.splitlines():
        found = re.match(r"(\S+)\s+(\d+) s\s+(\d+)-(\d+) s", line)
        if found:
            rows[found.group(1)] = (int(found.group(2)), int(found.group(4)))
    return rows


def test_dry_run_lists_the_steps_and_fits_8_minutes():
    done = run_script(GPU_CHECK_DRY_RUN="1")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = plan_rows(done.stdout)
    assert REQUIRED <= set(rows), set(rows)
    total = int(re.search(r"= (\d+) s: within the 480 s budget", done.stdout).group(1))
    assert max(end for _, end in rows.values()) < total <= BUDGET_S
    # the bench runs alone: after every step that uses the GPU, before decode only
    assert rows["bench"][1] - rows["bench"][0] == max(e for s, (_, e) in rows.items() if s != "decode" and s != "bench")


def test_help():
    done = run_script("--help")
    assert done.returncode == 0 and "GPU_CHECK_DRY_RUN=1" in done.stdout and "MAX_JOBS" in done.stdout


def test_dry_run_fails_when_the_boxes_exceed_the_budget():
    done = run_script(GPU_CHECK_DRY_RUN="1", GPU_CHECK_BOX_BENCH="400")
    assert done.returncode == 1
    assert "OVER the 480 s budget" in done.stdout and "does not fit" in done.stderr


def test_a_second_run_of_some_steps(tmp_path):
    """GPU_CHECK_STEPS: only the named steps run, ordered among themselves as in the plan."""
    selected = "env,prepare,build,cuda-tests,bench"
    done = run_script(GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS=selected)
    assert done.returncode == 0
    rows = plan_rows(done.stdout)
    assert list(rows) == selected.split(",")
    assert rows["bench"] == (180, 30 + 120 + 90 + 180)  # after build and cuda-tests only
    # a step left out passes its order on: decode (after bench) still runs after cuda-tests
    rows = plan_rows(run_script(GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="env,prepare,cuda-tests,decode").stdout)
    assert rows["cuda-tests"] == (90, 30 + 90) and rows["decode"] == (20, 30 + 90 + 20)
    out = tmp_path / "out"
    done = run_script(GPU_CHECK_FAKE="1", OUT=str(out), GPU_CHECK_STEPS=selected)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [s["step"] for s in report.read_steps(out)] == selected.split(",")


def test_plan_schedule_is_the_longest_chain():
    steps = report.parse_plan(["a||10|", "b|a|20|", "c|a|50|", "d|b,c|5|"])
    assert report.schedule(steps) == {"a": (0, 10), "b": (10, 30), "c": (10, 60), "d": (60, 65)}
    text, ok = report.plan_text(steps, budget=70, reserve=5)
    assert ok and "= 70 s: within" in text
    assert not report.plan_text(steps, budget=69, reserve=5)[1]
    with pytest.raises(ValueError, match="no earlier step"):
        report.parse_plan(["a|b|1|"])


def check_returned_files(folder: Path):
    """What a lent machine returns: at most 8 plain files of at most 16 MiB, plain names."""
    entries = list(folder.iterdir())
    assert 0 < len(entries) <= 8, entries
    for p in entries:
        assert p.is_file() and p.stat().st_size <= 16 * 2**20, p
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name), p.name


def test_fake_run_orchestrates_every_step_and_leaves_8_files_at_most(tmp_path):
    out = tmp_path / "out"
    done = run_script(GPU_CHECK_FAKE="1", OUT=str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    steps = {s["step"]: s for s in report.read_steps(out)}
    assert set(steps) == REQUIRED | {"prepare", "bench-warm"}
    listed = [l.split()[0] for l in (out / "summary.txt").read_text().splitlines()[1:len(steps) + 1]]
    assert listed == list(plan_rows(run_script(GPU_CHECK_DRY_RUN="1").stdout))  # the plan's order
    assert all(s["rc"] in ("0", "skip") for s in steps.values()), steps
    assert steps["decode"]["rc"] == "skip"
    check_returned_files(out)
    assert {"summary.txt", "env.txt", "steps.tsv", "bench_results.csv", "NOTES.md",
            "gpu_check_logs.tar.gz"} == {p.name for p in out.iterdir()}
    # the summary comes last: the steps, then the bench's numbers
    tail = done.stdout.rstrip().splitlines()
    assert tail[-1].startswith("S3,joint,gate,bias") and "pa.triton TFLOP/s" in done.stdout
    notes = (out / "NOTES.md").read_text()
    assert "NVIDIA H200" in notes and '"sm90": ("torch", "triton", "cuda", "reference"),' in notes


def test_fake_run_a_step_over_its_box_or_failing_leaves_the_others(tmp_path):
    out = tmp_path / "out"
    done = run_script(GPU_CHECK_FAKE="1", OUT=str(out), GPU_CHECK_FAKE_SLEEP="racecheck-cuda=30",
                      GPU_CHECK_BOX_RACECHECK_CUDA="2", GPU_CHECK_FAKE_FAIL="triton-autotune")
    assert done.returncode == 1
    steps = {s["step"]: s for s in report.read_steps(out)}
    assert steps["racecheck-cuda"]["rc"] == "124" and int(steps["racecheck-cuda"]["seconds"]) < 10
    assert steps["triton-autotune"]["rc"] == "1" and steps["bench"]["rc"] == "0"
    summary = (out / "summary.txt").read_text()
    assert re.search(r"racecheck-cuda\s+TIMEOUT\s+\d/2 s", summary)
    assert "1 passed, 1 failed" in summary and "test_triton-autotune_b" in summary
    check_returned_files(out)


def test_a_run_stopped_from_outside_leaves_the_finished_steps_in_out(tmp_path):
    """The device tool stops a command at its time limit: $OUT then still holds at most 8 files
    with the steps that had ended (packed after every step)."""
    import signal
    import time

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env.update(PYTHON=sys.executable, GPU_CHECK_FAKE="1", OUT=str(out),
               GPU_CHECK_FAKE_SLEEP="bench=60", TMPDIR=str(tmp_path))
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "racecheck-cuda" not in _text(out / "summary.txt"):
            time.sleep(0.5)
        time.sleep(1)
    finally:  # every process of the run's session (timeout puts each step in a group of its own)
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    check_returned_files(out)
    summary = (out / "summary.txt").read_text()
    assert re.search(r"racecheck-cuda\s+ok", summary) and not re.search(r"^bench ", summary, re.M)
    assert (out / "env.txt").exists() and (out / "gpu_check_logs.tar.gz").exists()


def _session_pids(sid):
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # the fields after the name: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _text(path):
    return path.read_text() if path.exists() else ""


def test_collect_keeps_the_archive_under_the_size_limit(tmp_path):
    work, dest = tmp_path / "work", tmp_path / "out"
    (work / "bench").mkdir(parents=True)
    (work / "summary.txt").write_text("s\n")
    (work / "bench" / "results.csv").write_text("a,b\n1,2\n")
    (work / "bench" / "plot.png").write_bytes(os.urandom(3 * 2**20))
    (work / "big.log").write_bytes(os.urandom(3 * 2**20))
    left = report.collect(work, dest, limit=2 * 2**20 + 2**19)
    assert left == ["bench_results.csv", "gpu_check_logs.tar.gz", "summary.txt"]
    assert (dest / "gpu_check_logs.tar.gz").stat().st_size <= 2 * 2**20 + 2**19
    import tarfile
    with tarfile.open(dest / "gpu_check_logs.tar.gz") as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
    assert sizes["big.log"] == 2**20 and "bench/plot.png" not in sizes  # its last MiB; no image
    assert (work / "big.log").stat().st_size == 3 * 2**20  # the work folder is left as it is
    for i in range(6):  # 9 entries
        (dest / f"extra{i}").write_text("")
    with pytest.raises(RuntimeError, match="more than a lent machine returns"):
        report.collect(work, dest)


def test_results_folder_name():
    assert report.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert report.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert report.gpu_slug("") == "unknown-gpu"
    assert report.results_name("NVIDIA H200", "0123456789abcdef", "2026-11-21") == \
        "2026-11-21_h200_0123456789ab"
    assert report.results_name("NVIDIA H200", "abc/../x", "2026-11-21") == "2026-11-21_h200_abcx"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1"
failures="3" skipped="3" tests="11" time="12.0"><testcase classname="tests.gpu.test_spec_scale"
name="test_sdpa[triton-L4096]"><failure message="x"/></testcase><testcase classname="tests.cuda.t"
name="test_b"><failure message="y"/></testcase><testcase classname="tests.t" name="test_c">
<error message="z"/></testcase><testcase classname="tests.triton.t" name="test_d"><failure
message="NotImplementedError: backend 'triton' cannot serve this call: CPU tensors need the Triton
interpreter (TRITON_INTERPRET=1)"/></testcase><testcase classname="tests.t" name="test_ok"/></testsuite></testsuites>"""


def test_summary_reads_each_steps_results(tmp_path):
    (tmp_path / "steps.tsv").write_text(
        "build\t0\t40\t120\t\ntriton-autotune\t1\t150\t180\t\nmemcheck-cuda\t0\t30\t40\t\n"
        "racecheck-cuda\t124\t45\t45\tbox cut to the 45 s left\nbench\tskip\t0\t165\tno time left\n")
    (tmp_path / "build.log").write_text("...\nbuild took 37 s (MAX_JOBS=16)\n")
    (tmp_path / "junit_triton-autotune.xml").write_text(JUNIT)
    (tmp_path / "memcheck-cuda.sanitizer.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    by_step = {l.split()[0]: l for l in report.summary(tmp_path).splitlines()[1:]}
    assert "ok" in by_step["build"] and "40/120 s" in by_step["build"] and "took 37 s" in by_step["build"]
    assert "FAILED (1)" in by_step["triton-autotune"]
    assert "4 passed, 3 failed, 1 errors, 3 skipped (1 of the failures: CPU tensors made by the " \
        "test itself" in by_step["triton-autotune"]
    assert "test_sdpa[triton-L4096]" in by_step["triton-autotune"]
    assert "ERROR SUMMARY: 0 errors" in by_step["memcheck-cuda"]
    assert "TIMEOUT" in by_step["racecheck-cuda"] and "no sanitizer log" in by_step["racecheck-cuda"]
    assert "box cut" in by_step["racecheck-cuda"]
    assert "skipped" in by_step["bench"] and "no time left" in by_step["bench"]


def rows(*cells):
    return [dict(case_id=c, mode=m, provider=p, package=str(p.startswith("pa.")), status="ok",
                 correct=str(ok), ms=str(ms), tflops=str(1000 / ms)) for c, m, p, ms, ok in cells]


def test_numbers_table_ratios_to_the_fastest_correct_other_provider():
    table = report.numbers_table(rows(("x/E=128/L16384", "fwd", "torch.cudnn", 2.0, True),
                                      ("x/E=128/L16384", "fwd", "torch.flash", 1.0, False),
                                      ("x/E=128/L16384", "fwd", "pa.triton", 2.5, True),
                                      ("x/E=128/L16384", "fwd", "pa.cuda", 1.0, False)))
    line = table.splitlines()[1]
    assert "torch.cudnn 500" in line and "400 (0.80x)" in line and "1000! (2.00x)" in line


def test_auto_order_from_the_measurements():
    measured = rows(("a", "fwd", "pa.triton", 2.0, True), ("a", "fwd", "pa.torch", 1.0, True),
                    ("a", "fwd", "pa.cuda", 0.5, False), ("b", "fwd", "pa.triton", 1.0, True),
                    ("b", "fwd", "pa.torch", 1.5, True))
    # torch: 2x faster on a, 1.5x slower on b: geometric mean ahead; cuda failed a check
    assert report.backend_order(measured) == ["torch", "triton", "cuda", "reference"]
    assert report.backend_order(measured[:1]) == ["triton", "cuda", "torch", "reference"]
    assert report.order_entry(measured, "sm90") == '"sm90": ("torch", "triton", "cuda", "reference"),'
    assert report.device_kind_of(["device: NVIDIA H200, sm_90, 132 SMs"]) == "sm90"
    assert report.device_kind_of(["device: no CUDA device is visible"]) == "default"


def test_gpucheck_preset_is_the_headline_core():
    from bench.presets import PRESETS, gpu_check_flex_runs

    preset = PRESETS["gpucheck"]
    cases = preset.cases("bfloat16", "cuda")
    sdpa = [c for c in cases if c.kind == "sdpa" and "same work" not in c.family]
    assert sorted((c.seq_len, c.is_causal) for c in sdpa) == [(8192, False), (8192, True),
                                                               (16384, False), (16384, True)]
    assert all(c.head_dim == 128 and c.dtype == "bfloat16" for c in cases)
    peer = [c for c in cases if c.kind == "peer"]
    assert [(c.q_lens, c.gate, c.bias, c.normalize) for c in peer] == [((4096,) * 3, True, True, "joint")]
    assert {"pa.triton", "pa.cuda", "pa.torch", "torch.cudnn", "torch.flash", "torch.efficient",
            "flex", "fa4"} <= set(preset.providers) and preset.modes == ("fwd", "fwd+bwd")
    assert [c.seq_len for c in cases if gpu_check_flex_runs(c, False)] == [16384, 16384]
    # the most telling first (a bench cut short by its box keeps them): SDPA 16k, then peer
    assert (cases[0].kind, cases[0].seq_len, cases[0].is_causal) == ("sdpa", 16384, False)
    assert cases[1].kind == "peer" and "same work" in cases[-1].family


def test_test_device_moves_the_inputs(monkeypatch):
    """PEER_ATTENTION_TEST_DEVICE (the Triton suite on CUDA tensors): _cast moves every tensor."""
    import torch

    from tests import helpers

    monkeypatch.setattr(helpers, "TEST_DEVICE", "meta")
    q = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    cast = helpers._cast([q, torch.tensor([1, 2]), 3], torch.float16, [True, False, False])
    assert [t.device.type for t in cast[:2]] == ["meta", "meta"] and cast[2] == 3
    assert cast[0].dtype == torch.float16 and cast[0].requires_grad and cast[0].is_leaf


def test_sanitize_workload_lists_every_cuda_kernel():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanitize_workload.py"), "--list"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for head_dim in (32, 64, 96, 128, 160, 192, 256):  # every kernel instantiation: head dim x dtype
        for dtype in ("float16", "bfloat16"):
            assert any(l.startswith("cuda ") and f"E={head_dim} " in l and dtype in l for l in lines)
    for feature in ("peer-per-peer-gate-kvlen", "sdpa-float-mask-grad", "bottom-right-causal"):
        assert any(feature in l for l in lines)
    assert any(l.startswith("triton ") for l in lines)


def test_autotune_switch_keeps_one_config(monkeypatch):
    """PEER_ATTENTION_TRITON_AUTOTUNE=0 (the check's Triton suite and sanitizers): the pruner keeps
    one config that fits the device; unset (its autotune step, the bench), every fitting one."""
    import types

    import torch
    from peer_attention.triton_kernels import configs

    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "device_limits", lambda index: (90, 227 * 1024))
    # every candidate fits without spilling: what is kept depends on the switch alone
    monkeypatch.setattr(configs, "measure_on_device",
                        lambda *a, **k: dict(shared=0, tmem=0, trap=False, spills=0))
    kernel = types.SimpleNamespace(arg_names=("Q",))
    q = torch.empty(1, 1, 1, 128, dtype=torch.float16)
    for kind in ("fwd", "dq", "dkdv"):
        candidates = configs.autotune_configs(kind)
        prune = configs.make_pruner(kernel, kind)
        monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
        tuned = prune(candidates, {"Q": q}, E_PAD=128, EV_PAD=128)
        assert len(tuned) > 1, kind
        monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
        assert prune(candidates, {"Q": q}, E_PAD=128, EV_PAD=128) == tuned[:1], kind


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
    # the CUDA-only calls (the forward's gate-alone and bias-alone switches), served by the torch
    # backend here: their inputs and argument order are right
    real_peer = pa.peer_attention
    with monkeypatch.context() as patch:
        patch.setattr(pa, "peer_attention", lambda *a, backend=None, **kw: real_peer(
            *a, backend="torch" if backend == "cuda" else backend, **kw))
        cuda_calls = dict(workload.feature_calls("cuda"))
        for name in ("peer-joint-gate-kvlen", "peer-joint-bias-kvlen"):
            assert name not in calls
            assert cuda_calls[name](torch.float32, 16) < 1e-4, name
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


def test_host_only_cuda_tests_left_out_of_the_gpu_step_need_no_gpu():
    """The GPU step skips the tests/cuda files that only compile or emulate on the host (CI runs
    them): each exists and none of them touches a CUDA device."""
    text = SCRIPT.read_text()
    names = re.search(r"HOST_ONLY_CUDA_TESTS=\(([^)]*)\)", text).group(1).split()
    assert names
    for name in names:
        source = (ROOT / "tests" / "cuda" / f"{name}.py").read_text()
        assert not re.search(r"cuda\.is_available|device=\"cuda\"|\bDEVICE\b", source), name
