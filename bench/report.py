"""Outputs: the terminal table, results.csv, results.json and the PNG plots.

Figures per row (one row per case x provider x mode):
  ms        median milliseconds of one call (timing.py)
  ms_q1, ms_q3  first and third quartiles of the same repeats (the plots' error bars)
  tflops    flops / (ms * 1e-3) / 1e12, flops from flops.py (MATH.md's count)
  peak_mb   GPU memory the call needs on top of what was allocated before it (empty on CPU)
  speedup   ms of the best correct non-package provider of the same case and mode / ms
  correct   the provider matched the float64 reference once before timing (check.py)
  op_us, overhead_us   overhead suite only: the backend's op called directly, and API - op
  python_us  overhead suite only: the API's own Python cost (the op stubbed out, overhead.py)
  gb_s, copy_gb_s, bw_fraction, us_per_token   decode suite only (decode.py): bytes of K and V
             read / time, the device's copy bandwidth measured in the run, their ratio, and
             time / (batch x query tokens); there speedup is against the fastest torch SDPA row
"""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

CASE_COLUMNS = ["suite", "case_id", "family", "kind", "dtype", "device_type", "batch", "q_heads",
                "kv_heads", "head_dim", "value_dim", "q_lens", "kv_lens", "seq_len", "num_streams",
                "is_causal", "mask", "dropout_p", "peers", "gate", "bias", "kv_padding", "normalize"]
RESULT_COLUMNS = ["mode", "provider", "package", "status", "correct", "max_err", "ms", "ms_q1", "ms_q3",
                  "flops", "tflops",
                  "peak_mb", "speedup", "op_us", "overhead_us", "python_us", "note"]
DECODE_COLUMNS = ["page_size", "kv_bytes", "gb_s", "copy_gb_s", "bw_fraction", "us_per_token"]
META_COLUMNS = ["device_name", "torch_version", "triton_version", "cuda_version", "git_commit"]
COLUMNS = CASE_COLUMNS + RESULT_COLUMNS + DECODE_COLUMNS + META_COLUMNS
STATUSES = ("ok", "unavailable", "unsupported", "skipped", "oom", "error")


def metadata() -> Dict[str, str]:
    """Where and with what the run was taken."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device_name": device,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda or "none",
        "git_commit": git_commit(),
    }


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def complete(rows: Sequence[Dict], meta: Dict[str, str]) -> List[Dict]:
    """Every row with every column (missing figures empty) and the run's metadata."""
    def value(r, c):
        v = r.get(c)
        return meta.get(c, "") if v is None else v
    return [{c: value(r, c) for c in COLUMNS} for r in rows]


def write_csv(rows: Sequence[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_json(rows: Sequence[Dict], meta: Dict[str, str], settings: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "settings": settings, "columns": COLUMNS, "rows": list(rows)}, f, indent=1,
                  default=str)


def _fmt(value, digits=3) -> str:
    if value in ("", None):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[Dict], note_width: int = 70) -> str:
    """A fixed-width table of the rows (the CSV has every column)."""
    header = ["case", "mode", "provider", "status", "correct", "ms", "TFLOP/s", "peak MB", "speedup",
              "overhead us", "note"]
    lines = []
    for r in rows:
        note = str(r.get("note", ""))
        lines.append([r["case_id"], r["mode"], r["provider"], r["status"], _fmt(r.get("correct")),
                      _fmt(r.get("ms")), _fmt(r.get("tflops")), _fmt(r.get("peak_mb")),
                      _fmt(r.get("speedup")), _fmt(r.get("overhead_us")),
                      note if len(note) <= note_width else note[:note_width - 3] + "..."])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    return "\n".join(out)


# ---- plots ---------------------------------------------------------------------------------

def write_plots(rows: Sequence[Dict], meta: Dict[str, str], out_dir: str,
                throughput: bool = True) -> List[str]:
    """PNG plots; returns their paths.

    At any size: per suite, each package provider's speed relative to the fastest provider outside
    the package, per case and mode, with the spread of the repeats (<suite>_vs_best_other.png).
    With `throughput` (off for --quick on the CPU, where tiny shapes give noise-level TFLOP/s):
    TFLOP/s against sequence length, one line per provider, one PNG per suite and mode (a panel
    per case family and dtype); GB/s where rows carry a `gbps` figure (decode); peak memory for
    the memory suite; bars for the overhead suite."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_suite = defaultdict(list)
    for r in rows:
        by_suite[r["suite"]].append(r)
    for suite, group in sorted(by_suite.items()):
        if suite != "overhead":
            path = _relative_plot(plt, group, suite, meta,
                                  os.path.join(out_dir, f"{_slug(suite)}_vs_best_other.png"))
            if path:
                paths.append(path)
    if not throughput:
        return paths
    by_plot = defaultdict(list)
    for r in rows:
        by_plot[(r["suite"], r["mode"])].append(r)
    for (suite, mode), group in sorted(by_plot.items()):
        if suite == "overhead":
            paths.append(_overhead_plot(plt, group, meta, out_dir))
            continue
        if suite == "decode":  # decode is memory-bound: achieved bandwidth (bench/decode.py)
            paths.append(_line_plot(plt, group, "gb_s", "GB/s (K and V read / time)",
                                    f"{suite}, {mode}", meta, os.path.join(out_dir, "decode.png")))
            continue
        paths.append(_line_plot(plt, group, "tflops", "TFLOP/s", f"{suite}, {mode}", meta,
                                os.path.join(out_dir, f"{suite}_{_slug(mode)}.png")))
        if any(r.get("gbps") not in ("", None) for r in group):
            paths.append(_line_plot(plt, group, "gbps", "GB/s (bytes read and written / time)",
                                    f"{suite}, {mode}, bandwidth", meta,
                                    os.path.join(out_dir, f"{suite}_{_slug(mode)}_gbps.png")))
        if suite == "memory":
            paths.append(_line_plot(plt, group, "peak_mb", "peak MB (GPU; not measured on CPU)",
                                    f"{suite}, {mode}, peak memory", meta,
                                    os.path.join(out_dir, f"{suite}_{_slug(mode)}_peak_mb.png")))
    return paths


def _number(value):
    return None if value in ("", None) else float(value)


def relative_speeds(rows: Sequence[Dict]) -> List[Dict]:
    """Per case, mode and package provider: speed = best other's median ms / ours, and the range
    [best / our third quartile, best / our first quartile] of the repeats."""
    grid = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and _number(r.get("ms")):
            grid[(r["case_id"], r["mode"])].append(r)
    points = []
    for (case_id, mode), cells in grid.items():
        others = [r for r in cells if not _is_package(r) and r.get("correct") in (True, "True")]
        if not others:
            continue
        best = min(others, key=lambda r: float(r["ms"]))
        best_ms = float(best["ms"])
        for r in cells:
            if not _is_package(r):
                continue
            ms, q1, q3 = float(r["ms"]), _number(r.get("ms_q1")), _number(r.get("ms_q3"))
            points.append(dict(case_id=case_id, mode=mode, provider=r["provider"], best=best["provider"],
                               speed=best_ms / ms, low=best_ms / q3 if q3 else best_ms / ms,
                               high=best_ms / q1 if q1 else best_ms / ms,
                               wrong=r.get("correct") in (False, "False")))
    return points


def _is_package(r) -> bool:
    return r.get("package") in (True, "True")


def _relative_plot(plt, rows, suite, meta, path):
    points = relative_speeds(rows)
    if not points:
        return None
    labels = list(dict.fromkeys((p["case_id"], p["mode"]) for p in points))
    best = {(p["case_id"], p["mode"]): p["best"] for p in points}
    providers = sorted({p["provider"] for p in points})
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.3 * len(labels)))
    step = 0.6 / max(1, len(providers))
    for i, provider in enumerate(providers):
        mine = [p for p in points if p["provider"] == provider]
        ys = [labels.index((p["case_id"], p["mode"])) + (i - (len(providers) - 1) / 2) * step for p in mine]
        xs = [p["speed"] for p in mine]
        err = [[p["speed"] - p["low"] for p in mine], [p["high"] - p["speed"] for p in mine]]
        wrong = any(p["wrong"] for p in mine)
        ax.errorbar(xs, ys, xerr=err, fmt="o", markersize=4, capsize=2,
                    label=provider + (" (WRONG in some rows)" if wrong else ""))
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([f"{c.split('/', 1)[-1]} [{m}] vs {best[(c, m)]}" for c, m in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed vs the fastest provider outside the package (> 1: faster); "
                  "bars: quartiles of the repeats", fontsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{suite} | {meta['device_name']} | torch {meta['torch_version']} | "
                 f"{meta['git_commit'][:12]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return text.replace("+", "_").replace("/", "_")


def _line_plot(plt, rows, metric, ylabel, title, meta, path) -> str:
    panels = defaultdict(list)
    for r in rows:
        panels[(r["family"], r["dtype"])].append(r)
    n = len(panels)
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, ((family, dtype), group) in zip(axes.flat, sorted(panels.items())):
        lines = defaultdict(list)
        for r in group:
            if r["status"] == "ok" and r.get(metric) not in ("", None):
                lines[r["provider"]].append((r["seq_len"], r[metric], r.get("correct")))
        for provider, points in sorted(lines.items()):
            points.sort()
            wrong = any(c is False or c == "False" for _, _, c in points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linestyle="--" if wrong else "-", label=provider + (" (WRONG)" if wrong else ""))
        if not lines:
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{family} [{dtype}]", fontsize=9)
        ax.set_xlabel("sequence length (longest stream)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{title} | {meta['device_name']} | torch {meta['torch_version']} | {meta['git_commit'][:12]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _overhead_plot(plt, rows, meta, out_dir) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['family']}\n{r['provider']}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(ok) + 2), 4))
    xs = range(len(ok))
    ax.bar([x - 0.2 for x in xs], [r["ms"] * 1e3 for r in ok], width=0.4, label="public API call")
    ax.bar([x + 0.2 for x in xs], [r["op_us"] for r in ok], width=0.4, label="registered op, direct")
    for x, r in zip(xs, ok):
        ax.annotate(f"+{r['overhead_us']:.1f} us", (x, r["ms"] * 1e3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("microseconds per call")
    ax.set_title(f"overhead (target <= 20 us) | {meta['device_name']} | {meta['git_commit'][:12]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "overhead_fwd.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
