"""Ring and Ulysses against the one-process call, with gloo on the CPU, 2 and 4 ranks.

One spawned group per world size runs every case (tests/distributed/cases.py) and writes, per
rank, the largest error of the outputs and of every gradient (shards, gate, bias); each test
below reads its case. Float64; the local kernel is a parameter (cases.BACKENDS, the reference
by default).
"""
import json

import pytest
import torch.multiprocessing as mp

from .cases import BACKENDS, CASES, ERROR_CASES, TOLERANCE
from .workers import worker

WORLD_SIZES = (2, 4)
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def run(world, backend=BACKENDS[0]):
        if (world, backend) not in cache:
            out_dir = tmp_path_factory.mktemp(f"cp{world}{backend}")
            context = mp.start_processes(
                worker, args=(world, str(out_dir / "store"), str(out_dir), list(CASES), backend),
                nprocs=world, join=False, start_method="spawn")
            try:
                while not context.join(timeout=TIMEOUT_S):
                    pass
            finally:
                for process in context.processes:  # only the processes started here
                    if process.is_alive():
                        process.terminate()
            per_rank = []
            for rank in range(world):
                with open(out_dir / f"rank{rank}.json") as f:
                    per_rank.append(json.load(f))
            cache[world, backend] = per_rank
        return cache[world, backend]

    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_one_process(results, world, name, backend):
    for rank, found in enumerate(results(world, backend)):
        value = found[name]
        assert not isinstance(value, str), f"rank {rank} raised:\n{value}"
        assert value <= TOLERANCE, f"rank {rank}: max error {value:.3g}"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_calls_raise_on_every_rank(results, world, name):
    expected = {
        "uneven_shards": "key: shard lengths (dim -2) differ between ranks",
        "ulysses_heads": "divisible by the group size",
        "zigzag_odd": "query: with layout='zigzag'",
        "causal_lengths": "is_causal with context parallelism",
    }[name]
    for rank, found in enumerate(results(world)):
        message = found["error:" + name]
        assert message is not None, f"rank {rank}: no error raised"
        assert message.startswith("ValueError") and expected in message, message


def test_subgroups_run_their_own_rings(results):
    """4 ranks as two groups of 2, each with its own sequence and group= argument."""
    for rank, found in enumerate(results(4)):
        value = found["subgroups"]
        assert not isinstance(value, str), f"rank {rank} raised:\n{value}"
        assert value <= TOLERANCE, f"rank {rank}: max error {value:.3g}"
