"""Run cases x providers x modes; one result row (a dict, see report.COLUMNS) per combination.
The suites with calls of their own (variants, decode) run through their modules."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import peer_attention as pa

from . import overhead
from .check import Oracle, check_case
from .common import BACKWARD_MODES, Case, Provider, RunSettings, make_inputs, release
from .decode import decode_providers, run_decode_case
from .providers import PACKAGE_BACKENDS
from .rows import add_speedups, case_fields, error_status, run_provider, run_providers_interleaved
from .variants import run_variant_case


def run_overhead(case: Case, backends: Sequence[Optional[str]], settings: RunSettings):
    rows = []
    for backend in backends:
        name = f"pa.{backend or 'auto'}"
        base = dict(case_fields(case), provider=name, package=True, mode="fwd")
        reason = pa.available_backends().get(backend) if backend else None
        if reason:
            rows.append(dict(base, status="unavailable", note=reason))
            continue
        try:
            m = overhead.measure(case, backend, settings.overhead_calls, settings.overhead_samples)
        except Exception as exc:
            status, why = error_status(exc)
            rows.append(dict(base, status=status, note=why))
            continue
        met = "met" if m["python_us"] <= overhead.TARGET_US else "NOT met"
        served = f"auto chose {m['served_by']}; " if backend is None else ""
        rows.append(dict(base, status="ok", ms=m["api_us"] / 1e3, op_us=m["op_us"],
                         overhead_us=m["overhead_us"], python_us=m["python_us"],
                         note=f"{served}Python side target <= {overhead.TARGET_US:g} us {met}; fastest of "
                              f"{settings.overhead_samples} loops of {settings.overhead_calls} calls; medians: "
                              f"API {m['api_median_us']:.1f} us, op {m['op_median_us']:.1f} us"))
    return rows


def run_cases(cases: Sequence[Case], providers: Sequence[Provider], modes: Sequence[str],
              settings: RunSettings, progress=None) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    for case in cases:
        if case.suite == "overhead":
            backends = [b for b in PACKAGE_BACKENDS if f"pa.{b}" in {p.name for p in providers}] + [None]
            rows += run_overhead(case, backends, settings)
            if progress is not None:
                progress.update(len(backends))
            continue
        if case.suite == "variants":  # flash-attn style calls: bench/variants.py
            rows += run_variant_case(case, providers, modes, settings, progress)
            continue
        if case.suite == "decode":  # flash_attn_with_kvcache style calls: bench/decode.py
            rows += run_decode_case(case, providers, modes, settings, progress)
            continue
        case_rows: List[Dict[str, object]] = []
        applicable = [p for p in providers if case.kind in p.kinds]
        groups = [(False, [m for m in modes if m == "fwd"]), (True, [m for m in modes if m in BACKWARD_MODES])]
        for with_grads, group_modes in groups:
            if not group_modes:
                continue
            checked, check_note = check_case(case)
            oracle = Oracle(checked, with_grads)
            oracle.note = check_note
            inputs = oracle.inputs if checked == case else make_inputs(case, requires_grad=with_grads)
            if settings.timing.interleave:
                case_rows += run_providers_interleaved(case, applicable, oracle, inputs,
                                                       group_modes, settings)
                if progress is not None:
                    progress.update(len(applicable) * len(group_modes))
            for provider in ([] if settings.timing.interleave else applicable):
                if progress is not None:
                    progress.set_postfix_str(f"{case.case_id} {provider.name}"[-60:], refresh=False)
                case_rows += run_provider(case, provider, oracle, inputs, group_modes, settings)
                if progress is not None:
                    progress.update(len(group_modes))
                release(case.device)
            del oracle, inputs
            release(case.device)
        add_speedups(case_rows)
        rows += case_rows
    return rows


def count_rows(cases: Sequence[Case], providers: Sequence[Provider], modes: Sequence[str]) -> int:
    total = 0
    for case in cases:
        if case.suite == "overhead":
            total += len([p for p in providers if p.name.startswith("pa.")]) + 1
        elif case.suite == "decode":  # at most every decode provider, forward only
            total += len(decode_providers()) if "fwd" in modes else 0
        else:
            total += len([p for p in providers if case.kind in p.kinds]) * len(modes)
    return total


