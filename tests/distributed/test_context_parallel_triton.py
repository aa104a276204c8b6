"""The Triton kernels as the local kernel of ring and Ulysses (2 ranks, gloo, float32; on the
CPU they run under the Triton interpreter, so only a few cases): the ring's backward takes the
merged (out, lse) in "joint" mode; "peer" mode goes through Ulysses."""
import json

import pytest
import torch.multiprocessing as mp

from peer_attention import available_backends
from peer_attention.backends.triton import interpreter_enabled

from .workers import worker

CASES = ("sdpa-gqa_causal-ring-zigzag", "peer-peer_all-ulysses-zigzag")
TOLERANCE = 2e-5  # float32 kernels against the float64 reference


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    why = available_backends()["triton"]
    if why:
        pytest.skip(f"triton backend unavailable: {why}")
    if not interpreter_enabled():  # a GPU machine: gloo's tensors here are CPU tensors
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    out_dir = tmp_path_factory.mktemp("cp_triton")
    mp.start_processes(worker, args=(2, str(out_dir / "store"), str(out_dir), list(CASES),
                                     "triton", "float32", ()),
                       nprocs=2, join=True, start_method="spawn")
    results = []
    for rank in range(2):
        with open(out_dir / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("name", CASES)
def test_triton_local_kernel_matches_one_process(triton_results, name):
    for rank, found in enumerate(triton_results):
        value = found[name]
        assert not isinstance(value, str), f"rank {rank} raised:\n{value}"
        assert value <= TOLERANCE, f"rank {rank}: max error {value:.3g}"
