"""What the terminal shows after a run (the full table is in results.csv):

  newcomer_summary(rows)   per suite: the providers that ran, whether all were correct, how this
                           package's providers compare with the fastest outside it, and one line
                           per provider that could not run here, with the reason;
  headline_table(rows)     one line per case and mode: TFLOP/s per provider, the fastest provider
                           outside the package, and each package provider's ratio to it;
  cpu_table(rows)          the cpu preset: milliseconds per provider, and issue 9's targets (the
                           drop-in against torch's own SDPA, peer attention against the reference)
                           and issue 20's (peer attention through auto against the fastest
                           composition a user writes without this package).
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

NOT_RUN = ("unavailable", "unsupported", "skipped", "oom", "error")


def _ok(r: Dict) -> bool:
    return r.get("status") == "ok"


def _is_true(value) -> bool:
    return value is True or value == "True"


def _is_false(value) -> bool:
    return value is False or value == "False"


def _ratio_text(values: Sequence[float]) -> str:
    values = sorted(values)
    if values[0] == values[-1]:
        return f"{values[0]:.3g}x"
    return f"median {statistics.median(values):.3g}x (from {values[0]:.3g}x to {values[-1]:.3g}x)"


def _common_reason(rows: Sequence[Dict]) -> str:
    reasons = Counter(str(r.get("note") or r.get("status")) for r in rows)
    reason, _ = reasons.most_common(1)[0]
    if len(reasons) > 1:
        reason += f" (and {len(reasons) - 1} other reason{'s' if len(reasons) > 2 else ''})"
    return reason


def _suite_lines(suite: str, rows: Sequence[Dict]) -> List[str]:
    cases = {r["case_id"] for r in rows}
    modes = sorted({r["mode"] for r in rows})
    lines = [f"{suite}: {len(cases)} cases x {', '.join(modes)}"]
    by_provider: Dict[str, List[Dict]] = defaultdict(list)
    for r in rows:
        by_provider[r["provider"]].append(r)
    ran = {p: rs for p, rs in by_provider.items() if any(_ok(r) for r in rs)}
    never = {p: rs for p, rs in by_provider.items() if p not in ran}
    if ran:
        lines.append("  ran: " + ", ".join(sorted(ran)))
        checked = [r for rs in ran.values() for r in rs if _ok(r) and r.get("correct") not in ("", None)]
        wrong = [r for r in checked if _is_false(r.get("correct"))]
        if suite == "overhead":
            pass
        elif not wrong:
            lines.append(f"  correct: all {len(checked)} timed rows match the float64 reference")
        else:
            who = Counter(r["provider"] for r in wrong)
            lines.append("  WRONG: " + ", ".join(f"{p} in {n} rows" for p, n in sorted(who.items()))
                         + " (column correct=False in results.csv)")
    else:
        lines.append("  ran: nothing")
    for provider in sorted(p for p in ran if p.startswith("pa.")):
        speedups = [float(r["speedup"]) for r in ran[provider]
                    if _ok(r) and r.get("speedup") not in ("", None)]
        if speedups:
            lines.append(f"  {provider} vs the fastest provider outside the package: "
                         f"{_ratio_text(speedups)} over {len(speedups)} rows (> 1x: faster)")
    for r in rows:
        if suite == "overhead" and _ok(r):
            lines.append(f"  {r['family']} {r['provider']}: API {float(r['ms']) * 1e3:.1f} us, op "
                         f"{float(r['op_us']):.1f} us; Python side alone {float(r['python_us']):.1f} us "
                         "(target <= 20 us)")
    for provider, rs in sorted(ran.items()):
        missed = [r for r in rs if not _ok(r)]
        if missed:
            lines.append(f"  {provider} did not run {len(missed)} of {len(rs)} rows: "
                         f"{missed[0]['status']}, {_common_reason(missed)}")
    if never:
        lines.append("  cannot run here:")
        for provider, rs in sorted(never.items()):
            lines.append(f"    {provider}: {rs[0]['status']}, {_common_reason(rs)}")
    return lines


def newcomer_summary(rows: Sequence[Dict]) -> str:
    by_suite: Dict[str, List[Dict]] = defaultdict(list)
    for r in rows:
        by_suite[r["suite"]].append(r)
    lines: List[str] = []
    for suite, group in by_suite.items():
        lines += _suite_lines(suite, group)
    return "\n".join(lines)


def _cell(r) -> str:
    if r is None:
        return ""
    if not _ok(r):
        return "-"
    tflops = r.get("tflops")
    if tflops in ("", None):
        return "?"
    text = f"{float(tflops):.1f}" if float(tflops) < 100 else f"{float(tflops):.0f}"
    return text + ("!" if _is_false(r.get("correct")) else "")


def _aligned(header: List[str], lines: List[List[str]]) -> List[str]:
    """The header and lines as text columns, each as wide as its widest cell."""
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    return out + ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]


def headline_table(rows: Sequence[Dict]) -> str:
    """Cells: TFLOP/s ('!' = failed the reference check, '-' = did not run, blank = not
    applicable); 'best other' is the fastest correct provider outside the package; the ratio
    columns are each package provider's TFLOP/s over it."""
    timed = [r for r in rows if r.get("suite") != "overhead"]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    ours = [p for p in providers if p.startswith("pa.")]
    grid: Dict[tuple, Dict[str, Dict]] = defaultdict(dict)
    for r in timed:
        grid[(r["case_id"], r["mode"])][r["provider"]] = r
    header = ["case", "mode"] + providers + ["best other"] + [f"{p[3:]}/best" for p in ours] + ["peak MB"]
    lines = []
    for (case_id, mode), cells in grid.items():
        others = [r for p, r in cells.items() if not p.startswith("pa.") and _ok(r)
                  and _is_true(r.get("correct")) and r.get("tflops") not in ("", None)]
        best = max(others, key=lambda r: float(r["tflops"]), default=None)
        line = [case_id.split("/", 1)[1], mode] + [_cell(cells.get(p)) for p in providers]
        line.append(f"{best['provider']} {float(best['tflops']):.0f}" if best else "")
        for p in ours:
            r = cells.get(p)
            if best and r is not None and _ok(r) and r.get("tflops") not in ("", None):
                line.append(f"{float(r['tflops']) / float(best['tflops']):.2f}")
            else:
                line.append("")
        peaks = [f"{float(cells[p]['peak_mb']):.0f}" for p in ours
                 if p in cells and cells[p].get("peak_mb") not in ("", None)]
        line.append("/".join(peaks))
        lines.append(line)
    out = _aligned(header, lines)
    legend = ("TFLOP/s per provider ('!' failed the reference check, '-' did not run: see "
              "results.csv); ratios = package provider / best other; peak MB of the package "
              f"providers ({'/'.join(ours)})")
    return "\n".join(out + [legend])


DROPIN_BASELINE, PEER_BASELINE = "torch.sdpa", "pa.reference"


def _ms(r) -> str:
    if r is None:
        return ""
    if not _ok(r):
        return "-"
    return f"{float(r['ms']):.1f}" + ("!" if _is_false(r.get("correct")) else "")


def _target_text(cells: Dict[str, Dict], kind_is_sdpa: bool, dropin: float, peer: float) -> str:
    """'pa.auto 0.98x torch.sdpa, ... (>= 0.95: met)': ratio = baseline time / our time."""
    baseline = DROPIN_BASELINE if kind_is_sdpa else PEER_BASELINE
    target = dropin if kind_is_sdpa else peer
    base = cells.get(baseline)
    if base is None or not _ok(base) or not _is_true(base.get("correct")):
        return f"no {baseline} row to compare with"
    parts, met = [], True
    ours = ("pa.auto", "pa.torch") if kind_is_sdpa else ("pa.torch",)
    for name in ours:
        r = cells.get(name)
        if r is None or not _ok(r) or not _is_true(r.get("correct")):
            continue
        ratio = float(base["ms"]) / float(r["ms"])
        met &= ratio >= target
        parts.append(f"{name} {ratio:.2f}x")
    if not parts:
        return "no package row to compare"
    return f"{', '.join(parts)} vs {baseline} (>= {target:g}: {'met' if met else 'NOT met'})"


COMPOSITIONS = ("compose.packed", "compose.concat", "compose.pairs")


def _checked(r) -> bool:
    return r is not None and _ok(r) and _is_true(r.get("correct"))


def _composition_text(cells: Dict[str, Dict], target: float) -> str:
    """'pa.auto 1.02x compose.packed (>= 1: met)': the fastest correct composition's time / auto's."""
    comps = [cells[c] for c in COMPOSITIONS if _checked(cells.get(c))]
    ours = cells.get("pa.auto")
    if not comps or not _checked(ours):
        return ""
    best = min(comps, key=lambda r: float(r["ms"]))
    ratio = float(best["ms"]) / float(ours["ms"])
    return (f"pa.auto {ratio:.2f}x {best['provider']} (>= {target:g}: "
            f"{'met' if ratio >= target else 'NOT met'})")


def composition_ratios(rows: Sequence[Dict]) -> List[float]:
    """pa.auto's speed against the fastest composition, one number per peer case and mode."""
    grid: Dict[tuple, Dict[str, Dict]] = defaultdict(dict)
    for r in rows:
        if r.get("kind") == "peer":
            grid[(r["case_id"], r["mode"])][r["provider"]] = r
    ratios = []
    for cells in grid.values():
        comps = [cells[c] for c in COMPOSITIONS if _checked(cells.get(c))]
        if comps and _checked(cells.get("pa.auto")):
            ratios.append(min(float(c["ms"]) for c in comps) / float(cells["pa.auto"]["ms"]))
    return ratios


def cpu_table(rows: Sequence[Dict], dropin: float = 0.95, peer: float = 3.0,
              composition: float = 1.0) -> str:
    """Cells: median ms of the interleaved rounds ('!' failed the reference check, '-' did not
    run); the last column: each package provider's speed against the preset's baseline."""
    timed = [r for r in rows if r.get("suite") == "cpu"]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    grid: Dict[tuple, Dict[str, Dict]] = defaultdict(dict)
    kinds: Dict[str, bool] = {}
    for r in timed:
        grid[(r["case_id"], r["mode"])][r["provider"]] = r
        kinds[r["case_id"]] = r.get("kind") == "sdpa"
    header = ["case", "mode"] + providers + ["target (ratio = baseline time / ours)"]
    lines = []
    for (case_id, mode), cells in grid.items():
        line = [case_id.split("/", 1)[1], mode] + [_ms(cells.get(p)) for p in providers]
        targets = [_composition_text(cells, composition)] if not kinds[case_id] else []
        if kinds[case_id] or _ok(cells.get(PEER_BASELINE) or {}) or not targets[0]:
            targets.append(_target_text(cells, kinds[case_id], dropin, peer))
        line.append("; ".join(t for t in targets if t))
        lines.append(line)
    out = _aligned(header, lines)
    out.append("ms per call, median of rounds that call every provider once in shuffled order "
               "('!' failed the reference check, '-' did not run: see results.csv)")
    ratios = composition_ratios(timed)
    if ratios:
        out.append(f"peer attention (pa.auto) vs the fastest composition: {_ratio_text(ratios)} "
                   f"over {len(ratios)} rows (target >= {composition:g})")
    return "\n".join(out)
