"""The mmdit bench (bench/mmdit.py) runs on the CPU at --quick sizes: every provider gives
diffusers' numbers, in both modes, and the command line writes its JSON."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from bench import mmdit  # noqa: E402
from bench.timing import TimingSettings  # noqa: E402

ONCE = TimingSettings(warmup=0, repeats=1, budget_s=0.0)


def test_processor_rows_match_diffusers():
    rows = mmdit.run_suite(True, "cpu", torch.float32, ["fwd", "fwd+bwd"], settings=ONCE)
    assert {r["model"] for r in rows} == {"sd3", "flux", "wan_i2v"}
    providers = {r["provider"] for r in rows}
    assert {"diffusers.math", "diffusers.flash", "pa.auto", "pa.reference"} <= providers
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["peak_mb"] is None  # CPU: memory not measured
        assert r["max_err"] < 1e-5, r


def test_command_line_writes_json(tmp_path):
    code = mmdit.main(["--quick", "--device", "cpu", "--mode", "fwd", "--provider", "diffusers.math,pa.reference",
                       "--out", str(tmp_path)])
    assert code == 0
    with open(os.path.join(tmp_path, "mmdit.json")) as f:
        report = json.load(f)
    assert len(report["rows"]) == 6 and {r["provider"] for r in report["rows"]} == {"diffusers.math", "pa.reference"}


def test_kernel_cases_have_the_model_shapes():
    joint, wan = mmdit.mmdit_cases("bfloat16", "cuda", quick=False)
    assert (joint.q_lens, joint.q_heads, joint.head_dim, joint.normalize) == ((512, 4096), 24, 128, "joint")
    assert (wan.q_lens, wan.kv_lens, wan.normalize) == ((32760, 0, 0), (0, 512, 257), "peer")
