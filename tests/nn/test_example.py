"""The worked example runs end to end (a few steps; the full run is a minute of training)."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multistream.py"


def load_example():
    spec = importlib.util.spec_from_file_location("multistream_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_evaluates_and_plots(tmp_path):
    example = load_example()
    model, data, history = example.train(seconds=0, seed=0, steps=3, batch=16, log_every=1)
    assert [step for step, _ in history] == [0, 1, 2]
    accuracy, gates, per_example = example.evaluate(model, data, batch=32)
    assert 0.0 <= accuracy <= 1.0
    assert gates.shape == (3, 3) and per_example.shape == (32, 3, 3, 2, 8)
    assert torch.all((gates > 0) & (gates < 1))
    path = tmp_path / "gates.png"
    example.plot(history, str(path))
    assert path.stat().st_size > 1000
