"""The Python cost of a call (issue 2, "Performance"): the public API against the backend's op.

On a prebuilt problem (api.sdpa_problem / api.peer_problem), the direct call is
`dispatch.forward(name, problem)`: the backend's forward as the API reaches it (for a Python
backend in eager mode its kernel function, else the registered op), nothing else. The API call adds validation, layout normalisation, backend selection and the output
views. Both are timed in loops of `calls` calls, alternating API and op loops `samples` times.
Each figure is the fastest loop's time per call (as timeit recommends: slower loops measure
other processes, not the code), and the overhead is fastest API loop - fastest op loop, in
microseconds per call. Target: <= 20 us.

On the CPU the reference op costs 100+ us and varies with the tensors it is given (the API hands
it fresh packed buffers each call), which blurs that difference. So `python_us` isolates the
Python side exactly: the same API loop with the backend's op swapped for a stub that returns
precomputed outputs, minus a loop calling the stub alone.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch

from .common import Case, make_inputs

TARGET_US = 20.0


def _calls(case: Case, backend):
    import peer_attention as pa
    from peer_attention import api, dispatch

    x = make_inputs(case)
    if case.kind == "sdpa":
        q, k, v = x.queries[0], x.keys[0], x.values[0]
        problem = api.sdpa_problem(q, k, v)

        def api_call():
            return pa.scaled_dot_product_attention(q, k, v, backend=backend)
    else:
        opts = dict(peers=case.peer_table(), gate=x.gate, bias=x.bias, normalize=case.normalize,
                    is_causal=case.is_causal, kv_lengths=x.kv_lengths)
        problem = api.peer_problem(x.queries, x.keys, x.values, **opts)

        def api_call():
            return pa.peer_attention(x.queries, x.keys, x.values, backend=backend, **opts)
    served_by = dispatch.select(problem, backend).name

    def op_call():
        return dispatch.forward(served_by, problem)
    return api_call, op_call, served_by


def _loop_us(fn, calls: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def measure(case: Case, backend, calls: int = 100, samples: int = 41) -> Dict[str, float]:
    """{'api_us', 'op_us', 'overhead_us', 'served_by'} for one backend (None = auto)."""
    api_call, op_call, served_by = _calls(case, backend)
    with torch.no_grad():
        for fn in (api_call, op_call):  # warm-up (first calls pay for imports and caches)
            _loop_us(fn, max(10, calls // 10), case.device)
        api_us: List[float] = []
        op_us: List[float] = []
        for _ in range(samples):
            api_us.append(_loop_us(api_call, calls, case.device))
            op_us.append(_loop_us(op_call, calls, case.device))
        python_us = _python_side_us(api_call, op_call, served_by, calls, samples, case.device)
    return {
        "python_us": python_us,
        "api_us": min(api_us),
        "op_us": min(op_us),
        "overhead_us": min(api_us) - min(op_us),
        "api_median_us": statistics.median(api_us),
        "op_median_us": statistics.median(op_us),
        "served_by": served_by,
    }


def _python_side_us(api_call, op_call, served_by: str, calls: int, samples: int, device: str) -> float:
    from peer_attention import dispatch

    outputs = op_call()

    def stub(*args):
        return outputs

    # the kernel is reached through the registered op, or in eager mode through ops' eager table
    with dispatch.forward_kernel_replaced(served_by, stub):
        api_loops = [_loop_us(api_call, calls, device) for _ in range(samples)]
        stub_loops = [_loop_us(stub, calls, device) for _ in range(samples)]
    return min(api_loops) - min(stub_loops)
