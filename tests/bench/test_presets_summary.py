"""The headline preset's case list, the terminal summary and the compact headline table (CPU)."""
import time

import pytest

from bench import __main__ as cli
from bench.presets import HEADLINE_PROVIDERS, flex_runs, headline_cases
from bench.providers import all_providers
from bench.summary import headline_table, newcomer_summary


def test_headline_case_list_is_the_issue_s():
    cases = headline_cases("bfloat16", "cuda")
    sdpa = [c for c in cases if c.kind == "sdpa" and "same work" not in c.family]
    e128 = [c for c in sdpa if c.head_dim == 128]
    assert sorted((c.seq_len, c.is_causal) for c in e128) == sorted(
        (n, causal) for n in (1024, 2048, 4096, 8192, 16384) for causal in (False, True))
    assert all(c.batch * c.seq_len == 16384 and c.q_heads * c.head_dim == 2048 for c in sdpa)
    assert sorted((c.head_dim, c.is_causal) for c in sdpa if c.head_dim != 128) == [
        (64, False), (64, True), (256, False), (256, True)]
    assert all(c.seq_len == 8192 for c in sdpa if c.head_dim != 128)
    peer = [c for c in cases if c.kind == "peer"]
    assert sorted(c.normalize for c in peer) == ["joint", "peer"]
    for c in peer:
        assert c.q_lens == c.kv_lens == (4096, 4096, 4096) and c.gate and c.bias and c.peers is None
    same = [c for c in cases if "same work" in c.family]
    assert len(same) == 1 and same[0].q_lens == (12288,) and same[0].q_heads == peer[0].q_heads
    assert all(c.dtype == "bfloat16" and c.device == "cuda" for c in cases)
    assert len({c.case_id for c in cases}) == len(cases) == 17


def test_headline_providers_exist_and_flex_runs_a_subset():
    assert set(HEADLINE_PROVIDERS) <= set(all_providers())
    cases = headline_cases("bfloat16", "cuda")
    flexed = [c for c in cases if flex_runs(c, quick=False)]
    assert {c.kind for c in flexed} == {"sdpa", "peer"} and len(flexed) == 7


def test_preset_arguments():
    args = cli.parse_args(["--preset", "headline", "--device", "cpu"])
    assert args.modes == ["fwd", "fwd+bwd"] and args.dtypes == ["float32"]
    assert [p.name for p in args.providers] == list(HEADLINE_PROVIDERS)
    args = cli.parse_args(["--preset", "headline", "--device", "cpu", "--mode", "fwd",
                           "--provider", "pa.reference"])
    assert args.modes == ["fwd"] and [p.name for p in args.providers] == ["pa.reference"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "nope"])


def _row(case, mode, provider, status="ok", tflops=None, correct=True, speedup=None, note="",
         peak_mb=None, suite="headline"):
    return dict(suite=suite, case_id=f"{suite}/{case}", family=case.split("/")[0], mode=mode,
                provider=provider, package=provider.startswith("pa."), status=status,
                tflops=tflops, correct=correct if status == "ok" else "", speedup=speedup,
                note=note, peak_mb=peak_mb)


def test_headline_table_ratios_to_the_fastest_correct_outside_provider():
    rows = [
        _row("E=128/B16/L1024", "fwd", "pa.triton", tflops=300.0, peak_mb=40.0),
        _row("E=128/B16/L1024", "fwd", "pa.cuda", tflops=150.0, peak_mb=41.0),
        _row("E=128/B16/L1024", "fwd", "torch.cudnn", tflops=400.0),
        _row("E=128/B16/L1024", "fwd", "torch.flash", tflops=600.0, correct=False),  # wrong: no baseline
        _row("E=128/B16/L1024", "fwd", "fa4", status="unavailable", note="not importable"),
    ]
    table = headline_table(rows).splitlines()
    assert table[0].split()[:7] == ["case", "mode", "pa.triton", "pa.cuda", "torch.cudnn",
                                    "torch.flash", "fa4"]
    line = table[1].split()
    assert line[:2] == ["E=128/B16/L1024", "fwd"]
    assert line[2:7] == ["300", "150", "400", "600!", "-"]
    assert line[7:9] == ["torch.cudnn", "400"]  # the best correct provider outside the package
    assert line[9:] == ["0.75", "0.38", "40/41"]


def test_newcomer_summary_is_short_and_says_why():
    rows = []
    for case in ("E=16/B4/L32", "E=16/B2/L64"):
        for mode in ("fwd", "fwd+bwd"):
            rows += [
                _row(case, mode, "pa.reference", tflops=0.01, speedup=0.5, suite="sdpa"),
                _row(case, mode, "torch.math", tflops=0.02, speedup=1.0, suite="sdpa"),
                _row(case, mode, "pa.cuda", status="unavailable", note="no CUDA device is visible",
                     suite="sdpa"),
                _row(case, mode, "torch.flash", status="unsupported", suite="sdpa",
                     note="torch SDPA flash cannot run this case: no CUDA"),
            ]
    rows.append(_row("E=16/B4/L32", "fwd", "flex", tflops=0.01, correct=False, suite="sdpa"))
    text = newcomer_summary(rows)
    lines = text.splitlines()
    assert lines[0] == "sdpa: 2 cases x fwd, fwd+bwd"
    assert "ran: flex, pa.reference, torch.math" in text
    assert "WRONG: flex in 1 rows" in text
    assert "pa.reference vs the fastest provider outside the package: 0.5x" in text
    assert "    pa.cuda: unavailable, no CUDA device is visible" in lines
    assert "    torch.flash: unsupported, torch SDPA flash cannot run this case: no CUDA" in lines
    assert len(lines) <= 10


def test_quick_run_prints_the_summary_not_every_row(tmp_path, capsys):
    code = cli.main(["--quick", "--suite", "overhead,sdpa", "--case", "E=16,causal=True/B4",
                     "--provider", "pa.reference,torch.math,torch.cudnn", "--mode", "fwd",
                     "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "sdpa: 1 cases x fwd" in out and "cannot run here:" in out
    assert "torch.cudnn: unsupported, torch SDPA cudnn runs on CUDA tensors only" in out
    assert (tmp_path / "results.csv").read_text().count("\n") == 4  # header + 3 rows


def test_headline_preset_runs_on_tiny_shapes(tmp_path, capsys):
    code = cli.main(["--preset", "headline", "--quick", "--device", "cpu", "--case", "L8/",
                     "--provider", "pa.reference,torch.math", "--mode", "fwd", "--no-plots",
                     "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "best other" in out and "reference/best" in out


def test_an_interrupted_run_keeps_and_reports_what_it_measured(tmp_path, capsys, monkeypatch):
    real = cli.run_cases
    calls = []

    def stop_at_the_second_case(cases, *args, **kwargs):
        calls.append(cases[0].case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what gpu_check.sh's time limit sends
        return real(cases, *args, **kwargs)

    monkeypatch.setattr(cli, "run_cases", stop_at_the_second_case)
    code = cli.main(["--quick", "--suite", "sdpa", "--case", "E=16/", "--provider", "torch.math",
                     "--mode", "fwd", "--no-plots", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 130 and "INTERRUPTED after 1 of 2 cases" in out and "sdpa: 1 cases" in out
    assert (tmp_path / "results.csv").read_text().count("\n") == 2
    assert '"interrupted": true' in (tmp_path / "results.json").read_text()


def test_quick_on_the_cpu_leaves_out_the_memory_suite():
    suites = cli.parse_args(["--quick", "--device", "cpu"]).suites
    assert "memory" not in suites and {"sdpa", "peer", "overhead"} <= set(suites)
    assert "memory" in cli.parse_args(["--device", "cpu"]).suites
    assert cli.parse_args(["--quick", "--device", "cpu", "--suite", "memory"]).suites == ["memory"]


# ---- the cpu preset (issue 9's CPU targets) ------------------------------------------------

def test_cpu_case_list_is_the_issue_s():
    from bench.presets import CPU_PROVIDERS, cpu_cases

    float32 = cpu_cases("float32", "cpu")
    dropin = [c for c in float32 if c.kind == "sdpa"]
    assert [(c.batch, c.q_heads, c.seq_len, c.head_dim) for c in dropin] == [(12, 3, 1030, 16)]
    peer = [c for c in float32 if c.kind == "peer" and c.family.startswith("S3,")]
    assert sorted(c.normalize for c in peer) == ["joint", "peer"]
    assert all(c.q_lens == (1024,) * 3 and c.gate for c in peer)
    # issue 20: against the compositions, MMDiT-like and SD3-like joint, per-peer, tiny
    against = {c.family: c for c in float32 if c.kind == "peer" and not c.family.startswith("S3,")}
    assert against["mmdit,joint,E=64"].q_lens == (154, 1024)
    assert against["sd3,joint,E=64"].q_lens == (333, 4096)
    assert {c.normalize for c in against.values()} == {"joint", "peer"}
    assert any(f.startswith("tiny,") for f in against)
    assert [c.q_lens for c in cpu_cases("float32", "cpu", quick=True)
            if c.family == "tiny,S2,joint,E=16"] == [(32, 16)]  # tiny already: not shrunk
    assert [c.kind for c in cpu_cases("bfloat16", "cpu")] == ["sdpa"]  # peer: float32 only
    assert set(CPU_PROVIDERS) <= set(all_providers())
    args = cli.parse_args(["--preset", "cpu", "--device", "cpu"])
    assert args.dtypes == ["float32", "bfloat16"] and args.modes == ["fwd", "fwd+bwd"]
    assert [p.name for p in args.providers] == list(CPU_PROVIDERS)


def test_named_only_providers_are_not_in_the_default_list():
    args = cli.parse_args(["--quick", "--device", "cpu"])
    names = [p.name for p in args.providers]
    assert "pa.auto" not in names and "torch.sdpa" not in names and "pa.torch" in names


def test_interleaved_timing_alternates_and_reports_failures():
    from bench.timing import TimingSettings, interleaved_ms

    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    def broken():
        raise RuntimeError("boom")

    settings = TimingSettings(warmup=1, repeats=6, budget_s=0.0, min_repeats=6)
    result = interleaved_ms({"fast": fast, "slow": slow, "broken": broken}, "cpu", settings)
    assert isinstance(result["broken"], RuntimeError)
    assert result["slow"] > 2.0 > result["fast"]
    timed = calls[2:]  # after one warm-up call each
    assert len(timed) == 12 and all(sorted(timed[i:i + 2]) == ["fast", "slow"]
                                    for i in range(0, 12, 2))  # one of each per round


def test_cpu_table_ratios_against_torch_and_the_reference():
    rows = [
        dict(_row("dropin/B12/L1030/float32", "fwd", "pa.auto", suite="cpu"), ms=10.0, kind="sdpa"),
        dict(_row("dropin/B12/L1030/float32", "fwd", "pa.torch", suite="cpu"), ms=12.0, kind="sdpa"),
        dict(_row("dropin/B12/L1030/float32", "fwd", "torch.sdpa", suite="cpu"), ms=10.0, kind="sdpa"),
        dict(_row("S3/B2/L1024/float32", "fwd", "pa.torch", suite="cpu"), ms=100.0, kind="peer"),
        dict(_row("S3/B2/L1024/float32", "fwd", "pa.reference", suite="cpu"), ms=500.0, kind="peer"),
        dict(_row("S3/B2/L1024/float32", "fwd+bwd", "pa.torch", suite="cpu"), ms=100.0, kind="peer",
             correct=False),
        dict(_row("S3/B2/L1024/float32", "fwd+bwd", "pa.reference", suite="cpu"), ms=200.0,
             kind="peer"),
    ]
    from bench.summary import cpu_table

    lines = cpu_table(rows).splitlines()
    assert "pa.auto 1.00x, pa.torch 0.83x vs torch.sdpa (>= 0.95: NOT met)" in lines[1]
    assert "pa.torch 5.00x vs pa.reference (>= 3: met)" in lines[2]
    assert "100.0!" in lines[3] and "no package row to compare" in lines[3]


def test_cpu_table_ratio_against_the_fastest_composition():
    case = "mmdit,joint/B1/L154x1024/float32"
    rows = [dict(_row(case, "fwd", provider, suite="cpu"), ms=ms, kind="peer")
            for provider, ms in (("pa.auto", 8.0), ("compose.packed", 10.0), ("compose.concat", 9.0),
                                 ("pa.torch.pairs", 12.0))]
    rows += [dict(_row(case, "fwd+bwd", provider, suite="cpu"), ms=ms, kind="peer")
             for provider, ms in (("pa.auto", 20.0), ("compose.packed", 18.0))]
    from bench.summary import composition_ratios, cpu_table

    lines = cpu_table(rows).splitlines()
    assert "pa.auto 1.12x compose.concat (>= 1: met)" in lines[1]
    assert "pa.auto 0.90x compose.packed (>= 1: NOT met)" in lines[2]
    assert "no pa.reference row" not in lines[1]
    assert "vs the fastest composition: median" in lines[-1]
    assert sorted(composition_ratios(rows)) == [0.9, 1.125]


def test_cpu_preset_runs_on_tiny_shapes(tmp_path, capsys):
    code = cli.main(["--preset", "cpu", "--quick", "--device", "cpu", "--mode", "fwd",
                     "--dtype", "float32", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "target (ratio = baseline time / ours)" in out and "vs pa.reference" in out
    assert "correct: all" in out
