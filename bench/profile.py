"""--profile: a torch.profiler trace and the per-kernel table of one case x provider x mode.

Writes profile_<case>_<provider>_<mode>.json (open it in chrome://tracing or Perfetto) and the
key_averages table (sorted by device time on GPU, CPU time otherwise) as a .txt next to it.
"""
from __future__ import annotations

import os
import re

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .common import Case, Provider, make_inputs
from .rows import timed_call

ITERATIONS = 5


def profile_case(case: Case, provider: Provider, mode: str, out_dir: str) -> str:
    """Profile `ITERATIONS` timed runs after a warm-up; returns the table printed."""
    inputs = make_inputs(case, requires_grad=(mode != "fwd"))
    run, _note = provider.build(case, inputs)
    timed = timed_call(run, inputs, mode)
    for _ in range(2):  # warm-up: compilation and autotuning stay out of the trace
        timed()
    activities = [ProfilerActivity.CPU]
    on_gpu = case.device == "cuda"
    if on_gpu:
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(ITERATIONS):
            with record_function(f"{provider.name}:{mode}"):
                timed()
        if on_gpu:
            torch.cuda.synchronize()
    stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"profile_{case.case_id}_{provider.name}_{mode}")
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, stem + ".json"))
    sort_by = "cuda_time_total" if on_gpu else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30)
    with open(os.path.join(out_dir, stem + ".txt"), "w") as f:
        f.write(f"{case.case_id} | {provider.name} | {mode} | {ITERATIONS} iterations\n{table}\n")
    return f"trace: {os.path.join(out_dir, stem + '.json')}\n{table}"
