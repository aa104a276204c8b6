"""Each suite runs on tiny CPU shapes; the CSV/JSON schema; a wrong provider is flagged."""
import csv
import json
import os

import pytest
import torch

from bench import __main__ as cli
from bench.cases import SUITES, build_cases
from bench.check import check_case, reference_outputs
from bench.common import Provider, RunSettings, Unavailable, Unsupported, make_inputs
from bench.providers import all_providers
from bench.report import COLUMNS, complete, metadata
from bench.runner import run_cases
from bench.timing import TimingSettings

FAST = RunSettings(TimingSettings(warmup=0, repeats=1, budget_s=0.0), overhead_calls=3, overhead_samples=2)
CPU_PROVIDERS = ("pa.reference", "torch.math", "torch.efficient", "flex", "compose.pairs", "compose.concat")


def _providers(names=CPU_PROVIDERS):
    table = all_providers()
    return [table[n] for n in names]


def _smallest_per_family(cases, limit):
    seen, picked = set(), []
    for c in sorted(cases, key=lambda c: c.seq_len):
        if c.family not in seen:
            seen.add(c.family)
            picked.append(c)
    return picked[:limit]


@pytest.mark.parametrize("suite", [s for s in SUITES if s != "decode"])  # test_decode_suite.py
def test_each_suite_runs_on_tiny_shapes(suite):
    cases = _smallest_per_family(build_cases([suite], ["float32"], "cpu", quick=True), limit=2)
    assert cases
    rows = run_cases(cases, _providers(), ["fwd", "fwd+bwd"], FAST)
    assert rows
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, "nothing ran"
    if suite == "overhead":
        assert {r["provider"] for r in ok} >= {"pa.reference", "pa.auto"}
        for r in ok:
            assert r["op_us"] > 0 and r["ms"] > 0
            assert r["overhead_us"] == pytest.approx(r["ms"] * 1e3 - r["op_us"])
            # the Python side alone (op stubbed) is part of the API call, never all of it
            assert 0 < r["python_us"] < r["ms"] * 1e3
        return
    for r in ok:
        assert r["correct"] is True, r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["peak_mb"] is None  # CPU: memory not measured
    # every applicable provider has a row per mode, with a reason when it could not run
    for c in cases:
        names = {r["provider"] for r in rows if r["case_id"] == c.case_id}
        assert names == {p.name for p in _providers() if c.kind in p.kinds}
    for r in rows:
        if r["status"] != "ok":
            assert r["note"], r
    efficient = [r for r in rows if r["provider"] == "torch.efficient"]
    assert all(r["status"] == "unsupported" and "CUDA" in r["note"] for r in efficient)
    flex_bwd = [r for r in rows if r["provider"] == "flex" and r["mode"] == "fwd+bwd"]
    assert all(r["status"] == "unsupported" for r in flex_bwd)


def _wrong_provider(factor=1.01):
    """Returns the reference's outputs scaled by `factor`: a slightly wrong kernel."""
    def build(case, x):
        return (lambda: [o * factor for o in reference_outputs(case, x)]), "deliberately wrong"
    return Provider("wrong", False, ("sdpa", "peer"), build)


def _fine_provider():
    def build(case, x):
        return (lambda: reference_outputs(case, x)), ""
    return Provider("fine", False, ("sdpa", "peer"), build)


def test_wrong_provider_is_flagged_and_not_a_baseline():
    cases = _smallest_per_family(build_cases(["sdpa", "peer"], ["float32"], "cpu", quick=True), limit=20)
    cases = [c for c in cases if c.kind == "sdpa"][:1] + [c for c in cases if c.kind == "peer"][:1]
    rows = run_cases(cases, [_fine_provider(), _wrong_provider(), _providers(["pa.reference"])[0]],
                     ["fwd", "bwd"], FAST)
    for r in rows:
        if r["provider"] == "wrong":
            assert r["correct"] is False and "max abs error" in r["note"], r
        else:
            assert r["correct"] is True, r
    # the speed-up baseline is the best CORRECT non-package provider: the wrong one has speedup
    # relative to "fine", and "fine" is its own baseline
    for r in rows:
        if r["provider"] == "fine":
            assert r["speedup"] == pytest.approx(1.0)


def test_gradient_errors_are_caught():
    def build(case, x):
        def run():
            outs = reference_outputs(case, x)
            # right forward values, wrong gradient: the backward sees 2x the output
            return [o + (o - o.detach()) for o in outs]
        return run, ""
    bad_grads = Provider("bad-grads", False, ("sdpa",), build)
    case = _smallest_per_family(build_cases(["sdpa"], ["float32"], "cpu", quick=True), 1)[0]
    rows = run_cases([case], [bad_grads], ["fwd", "bwd"], FAST)
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["fwd"]["correct"] is True
    assert by_mode["bwd"]["correct"] is False and "dq" in by_mode["bwd"]["note"]


def test_unavailable_provider_is_reported_not_dropped():
    def build(case, x):
        raise Unavailable("needs hardware this machine does not have")
    case = build_cases(["sdpa"], ["float32"], "cpu", quick=True)[0]
    rows = run_cases([case], [Provider("absent", False, ("sdpa",), build)], ["fwd", "bwd", "fwd+bwd"], FAST)
    assert [r["status"] for r in rows] == ["unavailable"] * 3
    assert all("hardware" in r["note"] for r in rows)


def test_check_case_reduces_big_cases_and_drops_dropout():
    big = [c for c in build_cases(["sdpa"], ["float16"], "cpu", quick=False) if c.dropout_p > 0][-1]
    checked, note = check_case(big)
    assert checked.dropout_p == 0 and checked.batch == 1 and max(checked.q_lens) <= 512
    assert "without dropout" in note and "checked at" in note
    assert checked.family == big.family and checked.head_dim == big.head_dim


def test_inputs_are_reproducible():
    case = build_cases(["peer"], ["float32"], "cpu", quick=True)[1]
    a, b = make_inputs(case), make_inputs(case)
    for x, y in zip(a.differentiable(), b.differentiable()):
        assert torch.equal(x, y)


def test_cli_writes_csv_json_and_plots(tmp_path, capsys):
    out = str(tmp_path / "out")
    code = cli.main(["--quick", "--suite", "sdpa", "--case", "E=16/B4/L32/", "--mode", "fwd,bwd",
                     "--provider", "pa.reference,torch.math,torch.cudnn", "--plots", "--out", out])
    assert code == 0
    printed = capsys.readouterr().out
    assert "torch.math" in printed and "results.csv" in printed
    with open(os.path.join(out, "results.csv")) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert rows and all(r["git_commit"] and r["torch_version"] == torch.__version__ for r in rows)
    assert {r["provider"] for r in rows} >= {"pa.reference", "torch.math", "torch.cudnn"}
    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    assert set(data) == {"meta", "settings", "columns", "rows"}
    assert data["columns"] == COLUMNS and len(data["rows"]) == len(rows)
    assert set(data["meta"]) == {"device_name", "torch_version", "triton_version", "cuda_version", "git_commit"}
    assert all(set(r) == set(COLUMNS) for r in data["rows"])
    for name in ("sdpa_fwd.png", "sdpa_bwd.png", "sdpa_vs_best_other.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    assert all(float(r["ms_q1"]) <= float(r["ms"]) <= float(r["ms_q3"])
               for r in rows if r["status"] == "ok")


def test_quick_cpu_run_draws_the_relative_speed_plots(tmp_path, capsys):
    """Issue 20: the main job's --quick on the CPU draws, per suite, our speed relative to the
    fastest provider outside the package with the spread of the repeats, and says where (no
    TFLOP/s plots there: noise at tiny shapes)."""
    out = str(tmp_path / "out")
    code = cli.main(["--quick", "--device", "cpu", "--suite", "sdpa,peer", "--case", "/B2/",
                     "--mode", "fwd", "--provider", "pa.torch,torch.math,compose.pairs,compose.packed",
                     "--out", out])
    assert code == 0
    printed = capsys.readouterr().out
    paths = [os.path.join(out, f"{suite}_vs_best_other.png") for suite in ("sdpa", "peer")]
    assert "plots (PNG): " in printed and all(path in printed for path in paths)
    assert sorted(os.listdir(out)) == ["peer_vs_best_other.png", "results.csv", "results.json",
                                       "sdpa_vs_best_other.png"]
    for path in paths:
        assert os.path.getsize(path) > 1000


def test_relative_speeds_use_the_fastest_correct_other_and_the_quartiles():
    from bench.report import relative_speeds

    def row(provider, package, ms, q1="", q3="", correct=True):
        return dict(case_id="c", mode="fwd", provider=provider, package=package, status="ok",
                    ms=ms, ms_q1=q1, ms_q3=q3, correct=correct)
    points = relative_speeds([row("pa.torch", True, 2.0, 1.0, 4.0), row("torch.math", False, 4.0),
                              row("flex", False, 1.0, correct=False)])
    assert points == [dict(case_id="c", mode="fwd", provider="pa.torch", best="torch.math",
                           speed=2.0, low=1.0, high=4.0, wrong=False)]


def test_complete_fills_every_column():
    row = complete([{"case_id": "x", "correct": False}], metadata())[0]
    assert list(row) == COLUMNS
    assert row["correct"] is False and row["ms"] == "" and row["torch_version"] == torch.__version__


def test_profile_writes_a_trace(tmp_path, capsys):
    code = cli.main(["--profile", "--quick", "--suite", "sdpa", "--case", "E=16/B4/L32/", "--provider", "torch.math",
                     "--mode", "fwd+bwd", "--out", str(tmp_path)])
    assert code == 0
    files = os.listdir(tmp_path)
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".txt") for f in files)
    assert "Self CPU" in capsys.readouterr().out


PEER_VARIANTS = [dict(), dict(gate=True, kv_padding=True, is_causal=True),
                 dict(normalize="peer", bias=False, gate=True, kv_padding=True, is_causal=True)]


@pytest.mark.parametrize("variant", range(len(PEER_VARIANTS)))
def test_peer_compositions_and_flex_match_the_reference(variant):
    """Every family of the peer suite, with extra options, through flex and the compositions:
    whatever can run passes the check (forward; the compositions also backward)."""
    import dataclasses

    from bench.check import Oracle

    cases = _smallest_per_family(build_cases(["peer"], ["float32"], "cpu", quick=True), limit=10)
    cases = [dataclasses.replace(c, batch=1, **PEER_VARIANTS[variant]) for c in cases]
    cases = [dataclasses.replace(c, bias=False) if c.normalize == "peer" else c for c in cases]
    checked = 0
    for case in cases:
        for with_grads, names in ((False, ["flex", "compose.pairs", "compose.concat"]),
                                  (True, ["compose.pairs", "compose.concat"])):
            oracle = Oracle(case, with_grads)
            for provider in _providers(names):
                try:
                    run, _ = provider.build(case, oracle.inputs)
                except Unsupported:
                    continue
                correct, err, failure = oracle.compare(run)
                assert correct, (case.case_id, provider.name, with_grads, failure)
                checked += 1
    assert checked >= 3 * len(cases)  # flex + one composition forward, that composition backward
