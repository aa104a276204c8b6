"""A fake step of scripts/gpu_check.sh (GPU_CHECK_FAKE=1): sleeps, then leaves the files the real
step leaves (env.txt, a junit XML, a sanitizer log, bench CSVs), so that the orchestration, the
time boxes, the summary and the collected files can be tested on any machine in seconds.

    GPU_CHECK_FAKE=1 GPU_CHECK_FAKE_SLEEP="bench=5,build=1" GPU_CHECK_FAKE_FAIL="cuda-tests" \
        GPU_CHECK_BOX_BENCH=2 bash scripts/gpu_check.sh DIR

GPU_CHECK_FAKE_SLEEP: seconds per step (default 0.1); GPU_CHECK_FAKE_FAIL: steps that fail;
GPU_CHECK_FAKE_BIG: MiB of incompressible log that the bench step writes (tests the size limit).
"""
from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

COLUMNS = ("suite", "case_id", "family", "kind", "head_dim", "mode", "is_causal", "seq_len",
           "provider", "package", "status", "correct", "ms", "tflops")


def _setting(name: str) -> dict:
    pairs = (p.split("=", 1) for p in os.environ.get(name, "").split(",") if "=" in p)
    return {k.strip(): v.strip() for k, v in pairs}


def bench_rows(wrong: bool = False) -> str:
    """results.csv of two cases x two modes: torch.cudnn and the package's backends."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for case, kind, scale in (("gpucheck/E=128,causal=False/B1/L16384/bfloat16", "sdpa", 1.0),
                              ("gpucheck/S3,joint,gate,bias,E=128/B1/L4096x4096x4096/bfloat16", "peer", 0.5)):
        for mode, m in (("fwd", 1.0), ("fwd+bwd", 2.5)):
            for provider, package, tflops in (("torch.cudnn", False, 600), ("pa.triton", True, 540),
                                              ("pa.cuda", True, 300), ("pa.torch", True, 580)):
                ms = 10 * m * 600 / tflops / scale
                correct = not (wrong and provider == "pa.cuda")
                writer.writerow(("gpucheck", case, "f", kind, 128, mode, False, 16384, provider,
                                 package, "ok", correct, f"{ms:.3f}", f"{tflops * scale:.1f}"))
    return out.getvalue()


def junit(step: str, fail: bool) -> str:
    case = (f'<testcase classname="tests.gpu.test_spec_scale" name="test_{step}_b">'
            + ('<failure message="boom"/>' if fail else "") + "</testcase>")
    return (f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="2" failures="{int(fail)}" '
            f'errors="0" skipped="0"><testcase classname="tests.x" name="test_{step}_a"/>{case}'
            "</testsuite></testsuites>")


def main(step: str, folder: str) -> int:
    out = Path(folder)
    time.sleep(float(_setting("GPU_CHECK_FAKE_SLEEP").get(step, 0.1)))
    fail = step in os.environ.get("GPU_CHECK_FAKE_FAIL", "").split(",")
    print(f"fake {step}")
    if step == "env":
        (out / "env.txt").write_text("date: 2026-12-05T03:00:00Z\ncommit: fake0123\ncores: 16\n"
                                     "device: NVIDIA H200, sm_90, 132 SMs, 140 GiB\n")
    elif step == "build":
        print("build took 42 s (MAX_JOBS=16, archs: the visible GPU's)")
    elif step.endswith(("-suite", "-autotune", "-tests")):
        (out / f"junit_{step}.xml").write_text(junit(step, fail))
    elif step.startswith(("memcheck", "racecheck")):
        summary = "ERROR SUMMARY: 0 errors" if step.startswith("memcheck") else \
            "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
        (out / f"{step}.sanitizer.log").write_text(f"========= COMPUTE-SANITIZER\n========= {summary}\n")
    elif step in ("bench", "bench-warm"):
        folder = out / step / ("0" if step == "bench-warm" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.csv").write_text(bench_rows(wrong=fail))
        big = int(os.environ.get("GPU_CHECK_FAKE_BIG", "0"))
        if big and step == "bench":
            (folder / "trace.log").write_bytes(os.urandom(big * 2**20))
    elif step == "decode":
        (out / "decode.skip").write_text("bench/ has no decode suite yet (fake)\n")
        return 200
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
