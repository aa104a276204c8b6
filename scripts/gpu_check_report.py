"""Helpers of scripts/gpu_check.sh: its plan's budget, the summary, the files a lent machine
returns, the NOTES.md draft, and auto's backend order proposed from the measurements.

    python scripts/gpu_check_report.py plan BUDGET RESERVE < plan lines   (name|after|box|what)
        -> each step's worst-case start and end; exit 1 when the critical path plus RESERVE
           exceeds BUDGET seconds
    python scripts/gpu_check_report.py name "NVIDIA H200" 1a2b3c4 [2026-11-21]
        -> 2026-11-21_h200_1a2b3c4 (the folder under bench/results/)
    python scripts/gpu_check_report.py summary DIR      -> the tables (also DIR/summary.txt)
    python scripts/gpu_check_report.py notes DIR        -> DIR/NOTES.md, a draft to complete
    python scripts/gpu_check_report.py collect DIR OUT  -> at most 8 files of at most 16 MiB in OUT
    python scripts/gpu_check_report.py order CSV [KIND] -> an AUTO_ORDER entry for dispatch.py

The summary reads what the steps leave in DIR: steps.tsv (step, exit status, seconds, time box,
note), junit_<step>.xml (pytest), <step>.sanitizer.log (compute-sanitizer), bench/results.csv,
bench-warm/*/results.csv and decode/results.csv.
"""
from __future__ import annotations

import csv
import datetime
import io
import math
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

VENDOR_WORDS = {"nvidia", "geforce", "tesla"}
MAX_FILES, MAX_BYTES = 8, 16 * 2**20            # what a lent machine returns from $OUT
KEPT = ("summary.txt", "env.txt", "steps.tsv", "bench_results.csv", "NOTES.md")
ARCHIVE = "gpu_check_logs.tar.gz"
STATUS = {"0": "ok", "124": "TIMEOUT", "137": "KILLED", "skip": "skipped"}
PACKAGE_BACKENDS = ("triton", "cuda", "torch")
# the Triton backend's reason for CPU tensors without the interpreter (tests that build their own
# CPU tensors, outside tests.helpers' PEER_ATTENTION_TEST_DEVICE, meet it on a GPU machine)
CPU_ONLY = "CPU tensors need the Triton interpreter"


# --- the plan ----------------------------------------------------------------------------------

def parse_plan(lines: Iterable[str]) -> List[Dict[str, object]]:
    steps, names = [], set()
    for line in lines:
        if not line.strip():
            continue
        name, after, box, what = (line.rstrip("\n").split("|") + [""] * 4)[:4]
        deps = [d for d in after.split(",") if d]
        unknown = [d for d in deps if d not in names]
        if unknown:
            raise ValueError(f"step {name!r} runs after {unknown}, which no earlier step names")
        steps.append(dict(name=name, after=deps, box=int(box), what=what))
        names.add(name)
    return steps


def schedule(steps: List[Dict[str, object]]) -> Dict[str, Tuple[int, int]]:
    """Worst-case (start, end) of each step: it starts when the last step it runs after ends at
    its time box; steps with no order between them run at the same time."""
    times: Dict[str, Tuple[int, int]] = {}
    for s in steps:
        start = max((times[d][1] for d in s["after"]), default=0)
        times[s["name"]] = (start, start + s["box"])
    return times


def plan_text(steps, budget: int, reserve: int) -> Tuple[str, bool]:
    times = schedule(steps)
    total = max((end for _, end in times.values()), default=0) + reserve
    rows = [[s["name"], f"{s['box']} s", f"{times[s['name']][0]}-{times[s['name']][1]} s",
             ",".join(s["after"]) or "-", s["what"]] for s in steps]
    out = _aligned(["step", "box", "worst case", "after", "what"], rows)
    ok = total <= budget
    out += (f"\ncritical path {total - reserve} s + {reserve} s for the summary and the files = "
            f"{total} s: {'within' if ok else 'OVER'} the {budget} s budget")
    return out, ok


# --- folder names --------------------------------------------------------------------------------

def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (lower case, vendor words dropped)."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in VENDOR_WORDS]
    return "-".join(words) or "unknown-gpu"


def results_name(gpu_name: str, commit: str, date: Optional[str] = None) -> str:
    date = date or datetime.date.today().isoformat()
    commit = re.sub(r"[^0-9A-Za-z-]", "", commit)[:12] or "unknown"
    return f"{date}_{gpu_slug(gpu_name)}_{commit}"


# --- reading the results ---------------------------------------------------------------------

def read_steps(folder: Path) -> List[Dict[str, str]]:
    path = folder / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        parts = line.split("\t") + [""] * 5
        if parts[0]:
            steps.append(dict(step=parts[0], rc=parts[1], seconds=parts[2], box=parts[3],
                              note=parts[4]))
    return steps


def junit_counts(path: Path) -> Dict[str, object]:
    """tests, failures, errors, skipped and the failing test ids of a pytest junit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_ids"], counts["cpu_only"] = [], 0
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is None:
            continue
        counts["failed_ids"].append(f"{case.get('classname', '')}::{case.get('name', '')}")
        counts["cpu_only"] += CPU_ONLY in (bad.get("message", "") + (bad.text or ""))
    return counts


def junit_text(path: Path) -> str:
    if not path.exists():
        return "no junit XML (cut short before pytest wrote it?)"
    try:
        c = junit_counts(path)
    except ET.ParseError:
        return "unreadable junit XML"
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    text = f"{passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
    if c["cpu_only"]:
        text += (f" ({c['cpu_only']} of the failures: CPU tensors made by the test itself, which "
                 "the Triton backend declines on a GPU machine; a limit of the test, not a kernel defect)")
    if c["failed_ids"]:
        more = len(c["failed_ids"]) - 3
        text += "; failing: " + ", ".join(c["failed_ids"][:3]) + (f" and {more} more" if more > 0 else "")
    return text


def sanitizer_text(path: Path) -> str:
    """compute-sanitizer's own verdict from its log."""
    if not path.exists():
        return "no sanitizer log"
    found = re.findall(r"((?:ERROR|RACECHECK) SUMMARY: [^\n]+)", path.read_text(errors="replace"))
    return found[-1].strip() if found else "no summary line (cut short?)"


def read_rows(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def bench_text(path: Path) -> str:
    rows = read_rows(path)
    if not rows:
        return "no results.csv" if not path.exists() else "no rows"
    ok = [r for r in rows if r.get("status") == "ok"]
    wrong = sorted({r["provider"] for r in ok if r.get("correct") == "False"})
    text = f"{len(rows)} rows, {len(ok)} timed"
    return text + (f", WRONG: {', '.join(wrong)}" if wrong else ", every timed row correct")


def warm_text(folder: Path) -> str:
    rows = [r for p in sorted(folder.glob("*/results.csv")) for r in read_rows(p)]
    if not rows:
        return "no results"
    checked = [r for r in rows if r.get("status") == "ok"]
    wrong = sorted({f"{r['provider']} {r['case_id']}" for r in checked if r.get("correct") == "False"})
    failed = sorted({r["provider"] for r in rows if r.get("status") == "error"})
    text = f"{len(checked)} rows checked against float64"
    text += f"; WRONG: {', '.join(wrong)}" if wrong else ", all correct"
    return text + (f"; errors: {', '.join(failed)}" if failed else "")


def details(step: str, folder: Path) -> str:
    if step == "env":
        gpu = [l for l in _lines(folder / "env.txt") if l.startswith("device:")]
        return gpu[0] if gpu else ""
    if step == "build":
        took = [l for l in _lines(folder / "build.log") if l.startswith("build took")]
        return took[-1] if took else ""
    if (folder / f"junit_{step}.xml").exists() or step.endswith(("-tests", "-suite", "-autotune")):
        return junit_text(folder / f"junit_{step}.xml")
    if step.startswith(("memcheck", "racecheck")):
        return sanitizer_text(folder / f"{step}.sanitizer.log")
    if step == "bench-warm":
        return warm_text(folder / "bench-warm")
    if step in ("bench", "decode"):
        return bench_text(folder / step / "results.csv")
    return ""


def _lines(path: Path) -> List[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


# --- the summary -----------------------------------------------------------------------------

def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged."""
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header) - 1)]
    def line(cells):
        return ("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]).rstrip()
    return "\n".join([line(header)] + [line(r) for r in rows])


def status_of(rc: str) -> str:
    status = STATUS.get(rc, "FAILED")
    return status if rc in STATUS else f"{status} ({rc})"


def steps_table(folder: Path) -> str:
    """One row per step that ended, in the plan's order (plan.txt) when it is there."""
    order = {line.split("|")[0]: i for i, line in enumerate(_lines(folder / "plan.txt"))}
    rows = []
    for s in sorted(read_steps(folder), key=lambda s: order.get(s["step"], len(order))):
        found = details(s["step"], folder) if s["rc"] != "skip" else ""
        text = "; ".join(d for d in (s["note"], found) if d)
        rows.append([s["step"], status_of(s["rc"]), f"{s['seconds']}/{s['box'] or '-'} s", text])
    return _aligned(["step", "status", "time/box", "details"], rows)


def _num(r: Dict[str, str], key: str) -> Optional[float]:
    try:
        return float(r[key])
    except (KeyError, TypeError, ValueError):
        return None


def numbers_table(rows: List[Dict[str, str]]) -> str:
    """Per case and mode: the fastest correct provider outside the package (TFLOP/s), and each
    package provider's TFLOP/s with its ratio to it ('!' = failed the float64 check)."""
    grid: Dict[Tuple[str, str], List[Dict[str, str]]] = {}
    for r in rows:
        if r.get("suite") != "overhead":
            grid.setdefault((r["case_id"], r["mode"]), []).append(r)
    ours = list(dict.fromkeys(r["provider"] for r in rows if r.get("package") == "True"))
    out = []
    for (case_id, mode), cells in grid.items():
        timed = [r for r in cells if r.get("status") == "ok" and _num(r, "tflops")]
        others = [r for r in timed if r.get("package") == "False" and r.get("correct") == "True"]
        best = max(others, key=lambda r: _num(r, "tflops"), default=None)
        line = [case_id.split("/", 1)[-1], mode,
                f"{best['provider']} {_num(best, 'tflops'):.0f}" if best else "-"]
        for p in ours:
            r = next((r for r in timed if r["provider"] == p), None)
            if r is None:
                line.append("-")
                continue
            cell = f"{_num(r, 'tflops'):.0f}" + ("!" if r.get("correct") == "False" else "")
            if best:
                cell += f" ({_num(r, 'tflops') / _num(best, 'tflops'):.2f}x)"
            line.append(cell)
        out.append(line)
    if not out:
        return ""
    return _aligned(["case", "mode", "best other TFLOP/s"] + [f"{p} TFLOP/s (x best)" for p in ours], out)


def summary(folder: Path) -> str:
    text = steps_table(folder)
    numbers = numbers_table(read_rows(folder / "bench" / "results.csv"))
    if numbers:
        text += "\n\nbench (bf16; '!' = failed the float64 check; ratio to the best provider outside the package)\n"
        text += numbers
    return text


# --- NOTES.md --------------------------------------------------------------------------------

NOTES_TEMPLATE = """# GPU check, {date}, {gpu}, commit {commit}

Command (one device call, 480 s): `bash scripts/gpu_check.sh` (results in $OUT, committed here).

## Environment

{env}

## What ran

{steps}

## What failed, and why

- (fill in: each failing test or sanitizer report, its cause, the fix and its commit)

## Numbers

{numbers}

Targets (issue 18, bf16, hd128, 16k tokens): pa.triton forward >= 1.0x torch's fastest backend
in the same run, backward >= 0.9x; peer attention 3 x 4k with gate and bias >= 2x the best
plain-PyTorch composition; every kernel within SPEC section 8; sanitizer clean.

## Auto's order for this device kind

{order}
"""


def notes(folder: Path) -> str:
    env = _lines(folder / "env.txt")
    date = next((l.split(": ", 1)[1][:10] for l in env if l.startswith("date:")), "")
    commit = next((l.split(": ", 1)[1] for l in env if l.startswith("commit:")), "")
    gpu = next((l.split(": ", 1)[1] for l in env if l.startswith("device:")), "")
    kind = device_kind_of(env)
    rows = read_rows(folder / "bench" / "results.csv")
    order = (f"Proposed by `python scripts/gpu_check_report.py order bench_results.csv {kind}`:\n\n"
             f"    {order_entry(rows, kind)}\n\nAdd it to AUTO_ORDER in peer_attention/dispatch.py."
             if rows else "(no bench rows)")
    return NOTES_TEMPLATE.format(
        date=date, gpu=gpu, commit=commit, env="\n".join(f"    {l}" for l in env),
        steps="```\n" + steps_table(folder) + "\n```",
        numbers=("```\n" + numbers_table(rows) + "\n```") if rows else "(no bench rows)",
        order=order)


def device_kind_of(env_lines: Sequence[str]) -> str:
    """'sm90' from env.txt's device line ('device: NVIDIA H200, sm_90, ...'), else 'default'."""
    for line in env_lines:
        found = re.search(r"\bsm_(\d+)", line)
        if line.startswith("device:") and found:
            return f"sm{found.group(1)}"
    return "default"


# --- auto's order ----------------------------------------------------------------------------

def backend_order(rows: List[Dict[str, str]]) -> List[str]:
    """The package backends from fastest to slowest on the bench's rows. A backend counts only
    where it was timed and correct; one that failed the float64 check anywhere goes after every
    correct one; among the rest, the geometric mean of its time ratio to each other backend over
    the (case, mode) pairs both ran decides (pairwise, so that missing rows weigh on no one)."""
    times: Dict[str, Dict[Tuple[str, str], float]] = {b: {} for b in PACKAGE_BACKENDS}
    wrong = set()
    for r in rows:
        name = r.get("provider", "")
        backend = name[3:] if name.startswith("pa.") else None
        if backend not in times or r.get("status") != "ok":
            continue
        if r.get("correct") == "False":
            wrong.add(backend)
        elif _num(r, "ms"):
            times[backend][(r["case_id"], r["mode"])] = _num(r, "ms")

    def score(b: str) -> float:
        logs = [math.log(times[o][k] / times[b][k]) for o in PACKAGE_BACKENDS if o != b
                for k in times[b].keys() & times[o].keys()]
        return sum(logs) / len(logs) if logs else float("-inf")
    measured = [b for b in PACKAGE_BACKENDS if times[b] and b not in wrong]
    unmeasured = [b for b in PACKAGE_BACKENDS if not times[b] and b not in wrong]
    return (sorted(measured, key=score, reverse=True) + unmeasured
            + [b for b in PACKAGE_BACKENDS if b in wrong] + ["reference"])


def order_entry(rows: List[Dict[str, str]], kind: str) -> str:
    return f'"{kind}": ({", ".join(repr(b).replace(chr(39), chr(34)) for b in backend_order(rows))}),'


# --- the files that come back ------------------------------------------------------------------

def collect(work: Path, dest: Path, limit: int = MAX_BYTES) -> List[str]:
    """Put into `dest` at most MAX_FILES plain files of at most `limit` bytes: the KEPT ones of
    `work` (its bench/results.csv as bench_results.csv) and one archive of the rest of `work`
    (logs kept to their last MiB, big images and JSON left out, if it would exceed `limit`).
    Run after every step, so that a run stopped from outside still leaves its latest results;
    `work` is left as it is. Returns the names in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    sources = {name: work / name for name in KEPT}
    sources["bench_results.csv"] = work / "bench" / "results.csv"
    for name, path in sources.items():
        if path.is_file():
            _replace(dest / name, path.read_bytes())
    rest = sorted(p for p in work.rglob("*") if p.is_file() and p.relative_to(work).as_posix()
                  not in KEPT + (ARCHIVE,))
    for trimmed in (False, True):
        data = _archive(work, rest, trimmed)
        if len(data) <= limit:
            break
    _replace(dest / ARCHIVE, data[:limit])  # still too big: its first `limit` bytes at least
    left = sorted(p.name for p in dest.iterdir())
    if len(left) > MAX_FILES:
        raise RuntimeError(f"{dest} holds {len(left)} entries, more than a lent machine returns")
    return left


def _archive(work: Path, paths: Sequence[Path], trimmed: bool) -> bytes:
    """A tar.gz of `paths` (relative to `work`), each read once (files still being written are
    taken as they are at that moment)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if trimmed and len(data) > 2**20:
                if path.suffix in (".png", ".json"):
                    continue
                data = data[-2**20:]
            info = tarfile.TarInfo(path.relative_to(work).as_posix())
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _replace(path: Path, data: bytes) -> None:
    """Write through a temporary name, so that a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def main(argv: List[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "plan" and len(args) == 2:
        text, ok = plan_text(parse_plan(sys.stdin), int(args[0]), int(args[1]))
        print(text)
        return 0 if ok else 1
    if command == "name" and len(args) in (2, 3):
        print(results_name(*args))
        return 0
    if command in ("summary", "notes") and len(args) == 1:
        folder = Path(args[0])
        text = summary(folder) if command == "summary" else notes(folder)
        _replace(folder / ("summary.txt" if command == "summary" else "NOTES.md"),
                 (text + ("\n" if command == "summary" else "")).encode())
        print(text)
        return 0
    if command == "collect" and len(args) == 2:
        print(" ".join(collect(Path(args[0]), Path(args[1]))))
        return 0
    if command == "order" and len(args) in (1, 2):
        print(order_entry(read_rows(Path(args[0])), args[1] if len(args) > 1 else "default"))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
