"""One provider on one case: checked once against the float64 oracle, then timed in each mode; one
result row (a dict, see report.COLUMNS) per mode. bench/runner.py and bench/variants.py run
their cases through these."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from .check import Oracle, score_elements
from .common import Case, Inputs, Provider, RunSettings, Skipped, Unavailable, Unsupported
from .flops import case_flops, tflops_per_s
from .timing import interleaved_ms, median_ms, peak_memory_mb


def case_fields(case: Case) -> Dict[str, object]:
    return {
        "suite": case.suite, "case_id": case.case_id, "family": case.family, "kind": case.kind,
        "dtype": case.dtype, "device_type": case.device, "batch": case.batch, "q_heads": case.q_heads,
        "kv_heads": case.kv_heads, "head_dim": case.head_dim, "value_dim": case.value_dim,
        "q_lens": "x".join(map(str, case.q_lens)), "kv_lens": "x".join(map(str, case.kv_lens)),
        "seq_len": case.seq_len, "num_streams": case.num_streams, "is_causal": case.is_causal,
        "mask": case.mask or "", "dropout_p": case.dropout_p,
        "peers": "" if case.peers is None else "/".join("".join("1" if v else "0" for v in row) for row in case.peers),
        "gate": case.gate, "bias": case.bias, "kv_padding": case.kv_padding, "normalize": case.normalize,
    }


def _score_limit_bytes(device: str) -> float:
    if device == "cuda":
        return 0.5 * torch.cuda.get_device_properties(0).total_memory
    return 4 * 2**30


def timed_call(fn: Callable, x: Inputs, mode: str) -> Callable[[], object]:
    """The function one timed run calls: the forward, the backward alone (of one retained
    forward graph), or both."""
    if mode == "fwd":
        return fn
    wanted = x.differentiable()

    def grads(outs):
        pairs = [(o, g) for o, g in zip(outs, x.grad_outputs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                   retain_graph=(mode == "bwd"), allow_unused=True)
    if mode == "fwd+bwd":
        return lambda: grads(fn())
    outs = fn()
    return lambda: grads(outs)


def error_status(exc: BaseException):
    if isinstance(exc, Unavailable):
        return "unavailable", str(exc)
    if isinstance(exc, (Unsupported, NotImplementedError)):
        return "unsupported", str(exc)
    if isinstance(exc, Skipped):
        return "skipped", str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom", "out of memory"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return "error", f"{type(exc).__name__}: {first_line}"[:300]


def _prepare(case: Case, provider: Provider, oracle: Oracle, inputs: Inputs):
    """(run, notes, correct, max_err): the provider checked once on the oracle's case, and its
    function on `case`; raises what the provider raises (Unavailable, Unsupported, ...)."""
    if provider.materializes_scores:
        need = score_elements(case) * 4 * (4 if oracle.with_grads else 2)
        if need > _score_limit_bytes(case.device):
            raise Skipped(f"it materialises the L x M scores (about {need / 2**30:.1f} GiB)")
    run_check, note = provider.build(oracle.case, oracle.inputs)
    correct, err, failure = oracle.compare(run_check)
    run = run_check if oracle.inputs is inputs else provider.build(case, inputs)[0]
    return run, [n for n in (note, oracle.note, failure) if n], correct, err


def _timed_row(case: Case, row: Dict[str, object], mode: str, ms: float, timed, notes,
               spread=None) -> Dict:
    flops = case_flops(case, mode)
    q1, q3 = spread if spread else ("", "")
    return dict(row, status="ok", ms=ms, ms_q1=q1, ms_q3=q3, flops=flops,
                tflops=tflops_per_s(flops, ms), peak_mb=peak_memory_mb(timed, case.device),
                note="; ".join(notes))


def _failed_row(row: Dict[str, object], exc: BaseException, notes) -> Dict:
    status, reason = error_status(exc)
    return dict(row, status=status, note="; ".join(list(notes) + [reason]))


def run_provider(case: Case, provider: Provider, oracle: Oracle, inputs: Inputs,
                 modes: Sequence[str], settings: RunSettings) -> List[Dict[str, object]]:
    """Check `provider` once on the oracle's case, then time it on `case` in each mode."""
    base = dict(case_fields(case), provider=provider.name, package=provider.package)
    try:
        run, notes, correct, err = _prepare(case, provider, oracle, inputs)
    except Exception as exc:  # reported in the table, never dropped
        status, reason = error_status(exc)
        return [dict(base, mode=m, status=status, note=reason) for m in modes]
    rows = []
    for mode in modes:
        row = dict(base, mode=mode, correct=correct, max_err=err)
        try:
            timed = timed_call(run, inputs, mode)
            spread: list = []
            ms = median_ms(timed, case.device, settings.timing, spread)
            rows.append(_timed_row(case, row, mode, ms, timed, notes, spread[0] if spread else None))
            del timed
        except Exception as exc:
            rows.append(_failed_row(row, exc, notes))
    return rows


def run_providers_interleaved(case: Case, providers: Sequence[Provider], oracle: Oracle,
                              inputs: Inputs, modes: Sequence[str],
                              settings: RunSettings) -> List[Dict[str, object]]:
    """Like run_provider for each provider, but the providers of a mode are timed in alternating
    rounds (timing.interleaved_ms)."""
    rows, ready = [], []
    for provider in providers:
        base = dict(case_fields(case), provider=provider.name, package=provider.package)
        try:
            run, notes, correct, err = _prepare(case, provider, oracle, inputs)
        except Exception as exc:
            status, reason = error_status(exc)
            rows += [dict(base, mode=m, status=status, note=reason) for m in modes]
            continue
        ready.append((provider.name, base, run, notes, correct, err))
    for mode in modes:
        timed, pending = {}, {}
        for name, base, run, notes, correct, err in ready:
            row = dict(base, mode=mode, correct=correct, max_err=err)
            try:
                timed[name] = timed_call(run, inputs, mode)
                pending[name] = (row, notes)
            except Exception as exc:
                rows.append(_failed_row(row, exc, notes))
        spreads: Dict[str, tuple] = {}
        results = interleaved_ms(timed, case.device, settings.timing, spreads=spreads)
        for name, (row, notes) in pending.items():
            result = results[name]
            if isinstance(result, Exception):
                rows.append(_failed_row(row, result, notes))
            else:
                rows.append(_timed_row(case, row, mode, result, timed[name], notes,
                                       spreads.get(name)))
    return rows


def add_speedups(rows: List[Dict[str, object]]) -> None:
    """speedup = (ms of the best correct non-package provider of the same case and mode) / ms."""
    best: Dict[tuple, float] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("correct") is True and not r["package"] and r.get("ms"):
            key = (r["case_id"], r["mode"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        key = (r["case_id"], r["mode"])
        if r.get("status") == "ok" and r.get("ms") and key in best:
            r["speedup"] = best[key] / r["ms"]
