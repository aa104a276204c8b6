"""Timing and memory figures.

- milliseconds: the median of repeated runs after warm-up. On a GPU `triton.testing.do_bench`
  (it flushes the L2 cache between runs and times with CUDA events; CUDA events directly when
  triton is missing); on the CPU `time.perf_counter` around each call.
- interleaved (presets that ask for it, e.g. `cpu`): the providers of one case and mode are
  timed in rounds, each round calling every provider once in a shuffled order, and each gets the
  median of its rounds. On a shared machine the load then weighs on all providers alike, so
  their ratios hold where single timings of one provider after the other drift by +-15%.
- spread: the first and third quartiles of the same repeats (columns ms_q1, ms_q3), which the
  plots draw as error bars.
- peak memory (GPU only): torch.cuda.max_memory_allocated() during one call minus the memory
  allocated just before it, i.e. what the call itself needs on top of its inputs (for "bwd": on
  top of the saved forward graph). On the CPU it is not measured (reported empty).
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass
class TimingSettings:
    warmup: int = 3            # CPU: warm-up calls; GPU: do_bench warm-up in ms is warmup_ms
    repeats: int = 20          # CPU: at most this many timed calls ...
    budget_s: float = 1.0      # ... or until this much time is spent (at least min_repeats calls)
    min_repeats: int = 3
    warmup_ms: int = 25        # GPU (do_bench)
    rep_ms: int = 100          # GPU (do_bench)
    interleave: bool = False   # time a case's providers in alternating rounds (interleaved_ms)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def quartiles(samples: List[float]) -> Tuple[float, float]:
    """(first, third) quartile of the repeats (both the sample itself when there is one)."""
    if len(samples) < 2:
        return samples[0], samples[0]
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


def median_ms(fn: Callable[[], object], device: str, settings: TimingSettings,
              spread: Optional[list] = None) -> float:
    """Median wall time of fn() in milliseconds; `spread` (a list) gets its quartiles appended."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_events_ms(fn, settings, spread)
        median, q1, q3 = do_bench(fn, warmup=settings.warmup_ms, rep=settings.rep_ms,
                                  quantiles=[0.5, 0.25, 0.75])
        if spread is not None:
            spread.append((float(q1), float(q3)))
        return float(median)
    for _ in range(settings.warmup):
        fn()
    samples, start = [], time.perf_counter()
    while len(samples) < settings.repeats and (len(samples) < settings.min_repeats
                                                 or time.perf_counter() - start < settings.budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    if spread is not None:
        spread.append(quartiles(samples))
    return statistics.median(samples)


def interleaved_ms(fns: Dict[str, Callable[[], object]], device: str, settings: TimingSettings,
                   seed: int = 0, spreads: Optional[Dict[str, Tuple[float, float]]] = None
                   ) -> Dict[str, object]:
    """{name: median ms over rounds} of several functions timed in alternation (see the module
    docstring); a function that raises gets the exception instead and leaves the rounds.
    `spreads` (a dict) gets each timed function's quartiles."""
    results: Dict[str, object] = {}
    alive = list(fns)
    for name in list(alive):
        try:
            for _ in range(settings.warmup):
                fns[name]()
            _synchronize(device)
        except Exception as exc:  # reported by the caller, never dropped
            results[name] = exc
            alive.remove(name)
    samples: Dict[str, List[float]] = {name: [] for name in alive}
    order, rng = list(alive), random.Random(seed)
    rounds, start = 0, time.perf_counter()
    while order and rounds < settings.repeats and (
            rounds < settings.min_repeats or time.perf_counter() - start < settings.budget_s):
        rng.shuffle(order)
        for name in list(order):
            try:
                t0 = time.perf_counter()
                fns[name]()
                _synchronize(device)
                samples[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                results[name] = exc
                order.remove(name)
        rounds += 1
    for name, values in samples.items():
        if name not in results:
            results[name] = statistics.median(values)
            if spreads is not None:
                spreads[name] = quartiles(values)
    return results


def _cuda_events_ms(fn, settings: TimingSettings, spread: Optional[list] = None) -> float:
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
    if spread is not None:
        spread.append(quartiles(samples))
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
