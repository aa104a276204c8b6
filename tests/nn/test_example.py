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


def test_gates_open_on_the_informative_peer():
    """The example's point, on a short run: after 150 steps every stream's gate on the signal
    peer is well above its gates on the noise and partial peers (all start at 0.5)."""
    import peer_attention as pa

    example = load_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a busy machine
    try:
        with pa.use_backend("reference"):  # the learning is under test here, not a kernel
            model, data, _ = example.train(seconds=0, seed=0, steps=150, batch=64)
            accuracy, gates, _ = example.evaluate(model, data, batch=1000)
    finally:
        torch.set_num_threads(threads)
    signal, noise, partial = 0, 1, 2
    assert accuracy > 0.6
    for s in range(3):
        assert gates[s, signal] > gates[s, noise] + 0.15, gates
        assert gates[s, signal] > gates[s, partial] + 0.15, gates
