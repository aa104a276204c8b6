"""Helpers of scripts/gpu_check.sh: the results folder's name and the summary table.

    python scripts/gpu_check_report.py name "NVIDIA H100 80GB HBM3" 1a2b3c4 [2026-11-21]
        -> 2026-11-21_h100-80gb-hbm3_1a2b3c4
    python scripts/gpu_check_report.py summary DIR
        -> the summary table of a gpu_check.sh run (also written to DIR/summary.txt)

The summary reads what the script leaves in DIR: steps.tsv (step, exit status, seconds, note),
junit_tests.xml (pytest), sanitize_<tool>.log (compute-sanitizer) and bench/results.csv.
"""
from __future__ import annotations

import csv
import datetime
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

VENDOR_WORDS = {"nvidia", "geforce", "tesla"}


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (lower case, vendor words dropped)."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in VENDOR_WORDS]
    return "-".join(words) or "unknown-gpu"


def results_name(gpu_name: str, commit: str, date: Optional[str] = None) -> str:
    date = date or datetime.date.today().isoformat()
    commit = re.sub(r"[^0-9A-Za-z-]", "", commit)[:12] or "unknown"
    return f"{date}_{gpu_slug(gpu_name)}_{commit}"


def read_steps(folder: Path) -> List[Dict[str, str]]:
    path = folder / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            steps.append(dict(step=parts[0], rc=parts[1], seconds=parts[2],
                              note=parts[3] if len(parts) > 3 else ""))
    return steps


def junit_counts(path: Path) -> Dict[str, object]:
    """tests, failures, errors, skipped and the first failing test ids of a pytest junit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["failed_ids"] = failed
    return counts


def junit_text(path: Path) -> str:
    if not path.exists():
        return "no junit XML (the run did not finish?)"
    c = junit_counts(path)
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    text = f"{passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
    if c["failed_ids"]:
        shown = ", ".join(c["failed_ids"][:3])
        more = len(c["failed_ids"]) - 3
        text += f"; failing: {shown}" + (f" and {more} more" if more > 0 else "")
    return text


def sanitizer_text(path: Path) -> str:
    """compute-sanitizer's own verdict from its log."""
    if not path.exists():
        return "no log"
    text = path.read_text(errors="replace")
    found = re.findall(r"((?:ERROR|RACECHECK) SUMMARY: [^\n]+)", text)
    return found[-1].strip() if found else "no summary line (did the run finish?)"


def bench_text(path: Path) -> str:
    if not path.exists():
        return "no results.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] == "ok"]
    wrong = [r for r in ok if r["correct"] == "False"]
    text = f"{len(rows)} rows, {len(ok)} timed, {len(wrong)} failed the reference check"
    headline = _headline_figure(rows)
    return text + (f"; {headline}" if headline else "")


def _headline_figure(rows: List[Dict[str, str]]) -> str:
    """pa.triton's TFLOP/s on the longest E=128 non-causal forward SDPA case and its ratio to the
    fastest correct provider outside the package."""
    cands = [r for r in rows if r["kind"] == "sdpa" and r["head_dim"] == "128" and r["mode"] == "fwd"
             and r["is_causal"] == "False" and r["mask"] == "" and r["status"] == "ok"
             and r["tflops"] and "same work" not in r["family"]]
    if not cands:
        return ""
    longest = max(int(r["seq_len"]) for r in cands)
    at = [r for r in cands if int(r["seq_len"]) == longest]
    ours = [r for r in at if r["provider"] == "pa.triton"]
    others = [r for r in at if r["package"] == "False" and r["correct"] == "True"]
    if not ours:
        return ""
    text = f"pa.triton E=128 L={longest} fwd {float(ours[0]['tflops']):.0f} TFLOP/s"
    if others:
        best = max(others, key=lambda r: float(r["tflops"]))
        text += (f" = {float(ours[0]['tflops']) / float(best['tflops']):.2f}x {best['provider']} "
                 f"({float(best['tflops']):.0f})")
    return text


def _details(step: str, folder: Path) -> str:
    if step == "tests":
        return junit_text(folder / "junit_tests.xml")
    if step.startswith("sanitize "):
        return sanitizer_text(folder / f"sanitize_{step.split()[1]}.log")
    if step.startswith("bench"):
        return bench_text(folder / "bench" / "results.csv")
    return ""


def summary(folder: Path) -> str:
    lines = []
    for s in read_steps(folder):
        status = {"0": "ok", "124": "TIMEOUT", "137": "KILLED", "skip": "skipped"}.get(s["rc"], "FAILED")
        if s["rc"] not in ("0", "124", "137", "skip"):
            status += f" ({s['rc']})"
        details = "; ".join(d for d in (s["note"], _details(s["step"], folder)) if d)
        lines.append([s["step"], status, f"{s['seconds']} s", details])
    header = ["step", "status", "time", "details"]
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(header[:3])]
    out = ["  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  details"]
    out += ["  ".join(c.ljust(w) for c, w in zip(l[:3], widths)) + "  " + l[3] for l in lines]
    return "\n".join(out)


def main(argv: List[str]) -> int:
    if len(argv) >= 3 and argv[0] == "name":
        print(results_name(argv[1], argv[2], argv[3] if len(argv) > 3 else None))
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        folder = Path(argv[1])
        text = summary(folder)
        (folder / "summary.txt").write_text(text + "\n")
        print(text)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
