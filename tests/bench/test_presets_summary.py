"""The headline preset's case list, the terminal summary and the compact headline table (CPU)."""
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
