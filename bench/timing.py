"""Timing and memory figures.

- milliseconds: the median of repeated runs after warm-up. On a GPU `triton.testing.do_bench`
  (it flushes the L2 cache between runs and times with CUDA events; CUDA events directly when
  triton is missing); on the CPU `time.perf_counter` around each call.
- peak memory (GPU only): torch.cuda.max_memory_allocated() during one call minus the memory
  allocated just before it, i.e. what the call itself needs on top of its inputs (for "bwd": on
  top of the saved forward graph). On the CPU it is not measured (reported empty).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class TimingSettings:
    warmup: int = 3            # CPU: warm-up calls; GPU: do_bench warm-up in ms is warmup_ms
    repeats: int = 20          # CPU: at most this many timed calls ...
    budget_s: float = 1.0      # ... or until this much time is spent (at least min_repeats calls)
    min_repeats: int = 3
    warmup_ms: int = 25        # GPU (do_bench)
    rep_ms: int = 100          # GPU (do_bench)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, settings: TimingSettings) -> float:
    """Median wall time of fn() in milliseconds."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_events_ms(fn, settings)
        return float(do_bench(fn, warmup=settings.warmup_ms, rep=settings.rep_ms, return_mode="median"))
    for _ in range(settings.warmup):
        fn()
    samples, start = [], time.perf_counter()
    while len(samples) < settings.repeats and (len(samples) < settings.min_repeats
                                                 or time.perf_counter() - start < settings.budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _cuda_events_ms(fn, settings: TimingSettings) -> float:
    for _ in range(settings.warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(settings.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def peak_memory_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """Extra memory of one call of fn() over what was allocated before it (GPU); None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20
