"""The bench `variants` suite: its cases, its providers checked against the reference on tiny CPU
shapes, and a wrong provider flagged."""
import dataclasses

import pytest
import torch

from bench.cases import build_cases
from bench.common import Provider, RunSettings
from bench.providers import all_providers
from bench.runner import run_cases
from bench.timing import TimingSettings
from bench.variants import VariantCase, document_lengths, variant_providers

FAST = RunSettings(TimingSettings(warmup=0, repeats=1, budget_s=0.0), overhead_calls=3, overhead_samples=2)
CPU = ("pa.reference", "torch.math", "flex")


def test_full_suite_shapes():
    cases = build_cases(["variants"], ["bfloat16"], "cuda", quick=False)
    by_family = {c.family: c for c in cases}
    window = [c for c in cases if c.family.startswith("window=4096")]
    assert [c.q_lens for c in window] == [(16384,)] and window[0].window == (4095, 0)
    varlen = [c for c in cases if c.kind == "varlen"]
    assert varlen and all(sum(c.q_lens) == 16 * 1024 and c.batch == 1 for c in varlen)
    lens = sorted(varlen[0].q_lens)
    median = lens[len(lens) // 2]
    assert lens[-1] > 4 * median and lens[0] < median / 3  # long-tailed on both sides
    assert {"softcap=30,causal", "alibi,causal", "sinks,causal"} <= set(by_family)
    assert all(c.batch * c.seq_len == 16 * 1024 for c in cases if c.kind == "sdpa")


def test_document_lengths_sum_and_minimum():
    for total in (100, 128, 16384):
        lens = document_lengths(total, seed=3)
        assert sum(lens) == total and min(lens) >= 4


def test_quick_suite_runs_and_is_correct_on_cpu():
    cases = build_cases(["variants"], ["float32"], "cpu", quick=True)
    providers = [all_providers()[n] for n in CPU]
    # fwd+bwd checks outputs and gradients; flex has no CPU backward, so it is timed forward only
    rows = run_cases(cases, providers[:2], ["fwd+bwd"], FAST)
    rows += run_cases(cases, providers[2:], ["fwd"], FAST)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == set(CPU)
    for r in ok:
        assert r["correct"] is True, r
        assert r["ms"] > 0
    # every case has pa.reference and torch.math in both modes, except what SDPA cannot express
    for c in cases:
        mine = [r for r in rows if r["case_id"] == c.case_id and r["status"] == "ok"]
        expected = {("pa.reference", "fwd+bwd"), ("flex", "fwd")}
        if c.softcap == 0:
            expected |= {("torch.math", "fwd+bwd")}
        assert {(r["provider"], r["mode"]) for r in mine} == expected, c.case_id
    for r in rows:
        if r["status"] != "ok":
            assert r["note"], r


def test_a_wrong_provider_is_flagged(monkeypatch):
    case = VariantCase("variants", "softcap", 1, 2, 1, 8, 8, (12,), (12,), "float32", "cpu", "sdpa",
                       is_causal=True, softcap=1.0)
    good = variant_providers()["pa.reference"]

    def wrong_build(c, x):
        run, note = good.build(c, x)
        return (lambda: [o * 1.01 for o in run()]), note

    monkeypatch.setattr("bench.variants.variant_providers",
                        lambda: {"pa.reference": dataclasses.replace(good, build=wrong_build)})
    rows = run_cases([case], [all_providers()["pa.reference"]], ["fwd"], FAST)
    assert len(rows) == 1 and rows[0]["correct"] is False and "max abs error" in rows[0]["note"]
