"""Launches run on the inputs' CUDA device, not the current one (device_map="auto" models put
layers on cuda:1 while cuda:0 is current): Triton launches on the current device and stream and
allocates tensor-descriptor scratch there. No GPU here: the guard is faked and the launch path
checked (every kernel launch, forward and backward, happens inside the guard of q's device)."""
import contextlib

import pytest
import torch

import peer_attention as pa
from peer_attention.triton_kernels import bwd, fwd, utils


def test_launch_device_enters_the_inputs_cuda_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or
                        contextlib.nullcontext())

    class FakeCuda:  # stands in for a tensor on cuda:1 (no GPU in CI)
        device = torch.device("cuda", 1)

    with utils.launch_device(FakeCuda()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with utils.launch_device(torch.zeros(1)):  # CPU (the interpreter): no CUDA call
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(not utils.INTERPRET, reason="checks the launch path on the interpreter")
def test_every_launch_runs_under_the_inputs_device(monkeypatch):
    events = []

    @contextlib.contextmanager
    def guard(tensor):
        events.append(("enter", tensor.device))
        yield
        events.append(("exit", tensor.device))

    def recording(name, kernel):
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    events.append(("launch", name))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()

    monkeypatch.setattr(fwd, "launch_device", guard)
    monkeypatch.setattr(bwd, "launch_device", guard)
    monkeypatch.setattr(fwd, "_attn_fwd_tuned", recording("fwd", fwd._attn_fwd_tuned))
    monkeypatch.setattr(bwd, "TUNED", {name: recording(name, k) for name, k in bwd.TUNED.items()})
    torch.manual_seed(0)
    qs = [torch.randn(1, 2, n, 16, requires_grad=True) for n in (20, 12)]
    ks = [torch.randn(1, 2, n, 16, requires_grad=True) for n in (18, 12)]
    vs = [torch.randn(1, 2, n, 16, requires_grad=True) for n in (18, 12)]
    gate = torch.rand(1, 2, 2, 2, 16, requires_grad=True)
    bias = torch.randn(1, 2, 2, 2, requires_grad=True)
    outs = pa.peer_attention(qs, ks, vs, gate=gate, bias=bias, backend="triton")
    events.append(("backward", None))
    sum(o.sum() for o in outs).backward()
    device = qs[0].device
    assert events == [
        ("enter", device), ("launch", "fwd"), ("exit", device), ("backward", None),
        ("enter", device), ("launch", "preprocess"), ("launch", "dq"), ("launch", "dkdv"),
        ("exit", device)], events


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    """Outside the interpreter the launch path never sees CPU tensors: the backend declines them
    with an error naming the fix (a subprocess: this one runs with TRITON_INTERPRET set, and
    without a visible GPU there as here)."""
    import os
    import subprocess
    import sys

    code = ("import torch, peer_attention as pa\n"
            "q = torch.randn(1, 2, 8, 16)\n"
            "try:\n"
            "    pa.scaled_dot_product_attention(q, q, q, backend='triton')\n"
            "except NotImplementedError as exc:\n"
            "    print(exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)" in result.stdout, \
        result.stdout
