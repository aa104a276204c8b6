"""python -m bench: time this package's kernels against torch SDPA, FlexAttention and compositions.

    python -m bench --quick                      # a minute or two, any machine (CPU: tiny shapes)
    python -m bench --preset headline            # the README's numbers (GPU, about 6 minutes)
    python -m bench --suite sdpa --mode fwd --dtype bfloat16
    python -m bench --list --suite peer          # the case ids
    python -m bench --suite decode               # KV-cache decode: achieved memory bandwidth
    python -m bench --profile --case sdpa/E=128,causal=True/B4/L4096 --provider pa.triton --mode fwd

See bench/README.md for the figures and their formulas.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import peer_attention as pa

from .cases import SUITES, build_cases
from .common import DTYPES, MODE_ALIASES, MODES, RunSettings, Skipped
from .decode import describe_bandwidth
from .presets import PRESETS, cpu_runs
from .profile import profile_case
from .providers import Provider, all_providers
from .report import complete, format_table, metadata, write_csv, write_json, write_plots
from .runner import count_rows, run_cases
from .summary import cpu_table, headline_table, newcomer_summary
from .timing import TimingSettings

DEFAULT_OUT = os.path.join("bench", "out")


def _csv_list(text: str, allowed, aliases=None):
    items = [aliases.get(t, t) if aliases else t for t in (s.strip() for s in text.split(",")) if t]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and short timings (a minute or two)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="a fixed case list with its providers and modes (headline: the README's "
                             "GPU numbers; cpu: the drop-in and peer attention on the CPU against "
                             "torch and the reference); --mode, --dtype, --provider, --case still "
                             "narrow it")
    parser.add_argument("--suite", default=None, help=f"comma list of {', '.join(SUITES)} (default: "
                        "all; --quick on the CPU leaves out memory, whose peak memory is measured on "
                        "GPUs only)")
    parser.add_argument("--mode", default=None, help=f"comma list of {', '.join(MODES)} "
                        "(or forward, backward, forward+backward; default: all, a preset's own)")
    parser.add_argument("--dtype", default=None, help="comma list of float16, bfloat16, float32 "
                        "(default: float16,bfloat16 on GPU; float32 on CPU)")
    parser.add_argument("--provider", default=None, help="comma list of provider names (default: all)")
    parser.add_argument("--case", default=None, help="only cases whose id contains this text")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/out)")
    parser.add_argument("--list", action="store_true", help="print the selected case ids and providers, run nothing")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--plots", action="store_true",
                        help="draw the TFLOP/s plots in --quick on the CPU too (skipped there by "
                             "default: tiny shapes give noise-level TFLOP/s; the plots of speed "
                             "relative to the fastest other provider are drawn at any size)")
    parser.add_argument("--full-table", action="store_true",
                        help="also print every row in the terminal (results.csv always has them)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one case (chosen with --case, --provider, --mode, --dtype): "
                             "torch.profiler trace + per-kernel table in --out")
    args = parser.parse_args(argv)
    try:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        default_suites = [s for s in SUITES if not (args.quick and args.device == "cpu" and s == "memory")]
        args.suites = _csv_list(args.suite or ",".join(default_suites), SUITES)
        default_modes, default_dtypes = ",".join(MODES), "float16,bfloat16"
        if args.device != "cuda":
            default_dtypes = "float32"
        elif args.quick:
            default_dtypes = "float16"
        providers = all_providers()
        default_providers = [n for n, p in providers.items() if p.default]
        if args.preset:
            preset = PRESETS[args.preset]
            default_modes = ",".join(preset.modes)
            default_dtypes = preset.dtypes["cuda" if args.device == "cuda" else "cpu"]
            default_providers = [n for n in preset.providers if n in providers]
        args.modes = _csv_list(args.mode or default_modes, MODES, MODE_ALIASES)
        args.dtypes = _csv_list(args.dtype or default_dtypes, tuple(DTYPES))
        names = _csv_list(args.provider, tuple(providers)) if args.provider else default_providers
        args.providers = [providers[n] for n in names]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    return args


def _settings(quick: bool, preset=None) -> RunSettings:
    interleave = preset is not None and PRESETS[preset].interleave
    if quick:
        # CPU: the reference check has already run each provider once (the warm-up)
        return RunSettings(TimingSettings(warmup=0, repeats=5, budget_s=0.05, min_repeats=2,
                                          warmup_ms=5, rep_ms=20, interleave=interleave),
                           overhead_calls=30, overhead_samples=15)
    if interleave:  # rounds of every provider: at least 5, up to 15 or 20 s per case and mode
        return RunSettings(TimingSettings(warmup=1, repeats=15, budget_s=20.0, min_repeats=5,
                                          interleave=True))
    return RunSettings()


def _run_only_where(providers, name: str, runs, reason: str):
    """Provider `name` runs only the cases where runs(case) holds; on the others it is a
    skipped row with `reason` (the other providers unchanged)."""
    def wrap(provider):
        def build(case, inputs):
            if not runs(case):
                raise Skipped(reason)
            return provider.build(case, inputs)
        return Provider(provider.name, provider.package, provider.kinds, build,
                        provider.materializes_scores)
    return [wrap(p) if p.name == name else p for p in providers]


def _preset_cpu(providers):
    """The cpu preset runs the reference on the peer cases only (cpu_runs)."""
    return _run_only_where(providers, "pa.reference", lambda case: cpu_runs(case, "pa.reference"),
                           "in the cpu preset the reference is the baseline of the peer cases only")


FLEX_REASONS = {
    "headline": "in the headline preset FlexAttention runs at E=128, L=4k and 16k and on the peer "
                "cases only (a compile per shape); run --suite sdpa --provider flex for the rest",
    "gpucheck": "in the gpucheck preset FlexAttention runs the SDPA cases at L=16k only (a "
                "compile per shape)",
}


def _preset_flex(providers, preset: str, quick: bool):
    """FlexAttention compiles per shape: in a preset it runs the cases the preset's flex_runs
    names."""
    runs = PRESETS[preset].flex_runs
    return _run_only_where(providers, "flex", lambda case: runs(case, quick), FLEX_REASONS[preset])


def _quick_gpu_flex(providers):
    """Compiling FlexAttention for each shape would take longer than --quick's minute or two."""
    return _run_only_where(providers, "flex", lambda case: False,
                           "in --quick on a GPU: compiling FlexAttention per shape takes minutes; "
                           "run without --quick or name it with --provider")


def select_cases(args):
    if args.preset:
        cases = [c for dtype in args.dtypes
                 for c in PRESETS[args.preset].cases(dtype, args.device, args.quick)]
    else:
        cases = build_cases(args.suites, args.dtypes, args.device, args.quick)
    if args.case:
        cases = [c for c in cases if args.case in c.case_id]
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = select_cases(args)
    providers = args.providers
    if args.preset and PRESETS[args.preset].flex_runs:
        providers = _preset_flex(providers, args.preset, args.quick)
    elif args.preset == "cpu":
        providers = _preset_cpu(providers)
    elif args.quick and args.device == "cuda" and not (args.provider and "flex" in args.provider):
        providers = _quick_gpu_flex(providers)
    if args.list:
        print("\n".join(c.case_id for c in cases))
        print("providers:", ", ".join(p.name for p in providers))
        return 0
    if not cases:
        print("no case matches the filters", file=sys.stderr)
        return 2
    if args.profile:
        case, provider = cases[0], providers[0]
        if len(cases) > 1:
            print(f"{len(cases)} cases match; profiling the first: {case.case_id} (narrow with --case)")
        print(profile_case(case, provider, args.modes[0], args.out))
        return 0

    os.makedirs(args.out, exist_ok=True)
    meta = metadata()
    print(f"device: {meta['device_name']} | torch {meta['torch_version']} | triton {meta['triton_version']} "
          f"| CUDA {meta['cuda_version']} | commit {meta['git_commit']}")
    print("package backends:", ", ".join(f"{n}: {why or 'available'}" for n, why in pa.available_backends().items()))
    settings = {"argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
                "preset": args.preset, "device": args.device}
    csv_path, json_path = os.path.join(args.out, "results.csv"), os.path.join(args.out, "results.json")
    start = time.perf_counter()
    try:
        from tqdm import tqdm
        progress = tqdm(total=count_rows(cases, providers, args.modes), unit="row", file=sys.stderr)
    except ImportError:
        progress = None
    rows, interrupted = [], False
    try:
        for case in cases:  # results are written after every case: a run cut short keeps them
            rows += complete(run_cases([case], providers, args.modes,
                                       _settings(args.quick, args.preset), progress), meta)
            write_csv(rows, csv_path)
    except KeyboardInterrupt:  # e.g. a time limit's SIGINT: report what was measured
        interrupted = True
    finally:
        if progress is not None:
            progress.close()
        settings["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(rows, meta, settings, json_path)
    if args.full_table:
        print(format_table(rows))
    if interrupted:
        print(f"INTERRUPTED after {len({r['case_id'] for r in rows})} of {len(cases)} cases")
        settings["interrupted"] = True
        write_json(rows, meta, settings, json_path)
    print(newcomer_summary(rows))
    if "decode" in {r["suite"] for r in rows}:
        print(describe_bandwidth(rows))
    if args.preset in ("headline", "gpucheck"):
        print(headline_table(rows))
    elif args.preset == "cpu":
        print(cpu_table(rows))
    throughput = not (args.quick and args.device == "cpu") or args.plots
    plots = [] if args.no_plots else write_plots(rows, meta, args.out, throughput)
    if plots:
        print("plots (PNG): " + ", ".join(plots))
    print(f"{len(rows)} rows in {settings['elapsed_s']:.1f} s; every row (with the reasons) in {csv_path}; "
          f"also results.json and {len(plots)} plots in {args.out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
