"""examples/diffusers_mmdit.py runs (tiny size) and its CPU peak-memory counter counts right."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "diffusers_mmdit.py"


def load_example():
    spec = importlib.util.spec_from_file_location("diffusers_mmdit_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_example_matches_diffusers(model):
    r = load_example().run(model, "tiny", "cpu", torch.float32, repeats=1)
    assert r["replaced"] == (2 if model == "sd3" else 3)  # sd3: 2 joint; flux: 1 double + 2 single
    assert r["max_abs_diff"] < 1e-5 and r["output_scale"] > 0.1
    assert r["default_ms"] > 0 and r["ours_ms"] > 0
    assert r["default_peak_mb"] > 0 and r["ours_peak_mb"] > 0


def test_live_storage_counter():
    example = load_example()
    with example.LiveStorageBytes() as counter:
        a = torch.ones(256, 256)  # 256 KiB
        b = a @ a                 # 512 KiB alive
        del a                     # 256 KiB
        c = b.t()                 # a view: no new memory
        d = b + 1                 # 512 KiB again
        del b, c, d
    assert counter.peak == 2 * 256 * 256 * 4
    assert counter.live == 0
