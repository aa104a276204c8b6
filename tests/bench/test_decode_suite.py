"""The decode suite (bench/decode.py) on tiny CPU shapes: rows for every provider, checked against
float64 math, with the bandwidth figures filled; the CLI writes them. No timing assertions."""
import csv
import os

import pytest

from bench import __main__ as cli
from bench.cases import build_cases
from bench.decode import DecodeCase, decode_providers, make_decode_inputs, reference_output
from bench.providers import all_providers
from bench.report import COLUMNS, complete, metadata
from bench.common import RunSettings
from bench.runner import run_cases
from bench.timing import TimingSettings

FAST = RunSettings(TimingSettings(warmup=0, repeats=1, budget_s=0.0))


def test_quick_cpu_grid_is_tiny_and_covers_the_layouts():
    cases = build_cases(["decode"], ["float32"], "cpu", quick=True)
    assert cases and all(isinstance(c, DecodeCase) and c.kind == "decode" for c in cases)
    assert {c.page_size for c in cases} == {0, 16} and {c.q_lens[0] for c in cases} == {1, 4}
    assert all(c.q_heads == 8 * c.kv_heads and c.kv_lens[0] <= 64 for c in cases)


def test_full_grid_spans_the_issue():
    cases = build_cases(["decode"], ["float16"], "cuda", quick=False)
    assert {c.page_size for c in cases} == {0, 16, 256}
    assert {c.q_lens[0] for c in cases} == {1, 4, 16} and {c.head_dim for c in cases} == {64, 128}
    assert {c.batch for c in cases} == {1, 8, 64}
    assert {c.kv_lens[0] for c in cases} == {1024, 8192, 32768, 131072}
    assert max(c.batch * c.kv_lens[0] for c in cases) <= 1 << 21


@pytest.mark.parametrize("page", [0, 16])
def test_tiny_decode_rows(page):
    case = next(c for c in build_cases(["decode"], ["float32"], "cpu", quick=True)
                if c.page_size == page and c.q_lens[0] == 4 and c.batch == 2)
    rows = run_cases([case], list(all_providers().values()), ["fwd", "fwd+bwd"], FAST)
    assert {r["provider"] for r in rows} == set(decode_providers())  # forward rows only
    assert all(r["mode"] == "fwd" for r in rows)
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    # the conftest's interpreter runs the Triton kernels on the CPU
    assert {"pa.auto", "pa.torch", "pa.triton", "torch.math"} <= set(ok)
    for r in ok.values():
        assert r["correct"] is True and r["max_err"] < 1e-4, r
        assert r["kv_bytes"] == case.batch * 64 * case.kv_heads * 2 * case.head_dim * 4
        assert r["gb_s"] > 0 and r["copy_gb_s"] > 0 and r["us_per_token"] > 0
        assert r["bw_fraction"] == pytest.approx(r["gb_s"] / r["copy_gb_s"])
    for r in rows:
        if r["status"] != "ok":
            assert r["note"], r
    assert set(complete(rows, metadata())[0]) == set(COLUMNS)


def test_paged_inputs_gather_to_the_same_keys():
    """The SDPA providers' gathered keys are the paged cache's, in block-table order."""
    case = DecodeCase("decode", "t", 2, 8, 1, 16, 16, (1,), (40,), "float32", "cpu", "decode",
                      page_size=16)
    x = make_decode_inputs(case)
    table = x.block_table.long()
    assert table.shape == (2, 3) and sorted(table.flatten().tolist()) == list(range(6))
    b, pos = 1, 37
    assert (x.k[b, :, pos] == x.k_cache[table[b, pos // 16], pos % 16]).all()
    assert reference_output(x).shape == (2, 1, 8, 16)


def test_cli_writes_decode_rows(tmp_path):
    out = str(tmp_path)
    code = cli.main(["--quick", "--suite", "decode", "--case", "contiguous/B1/L1/",
                     "--provider", "pa.torch,torch.math", "--out", out])
    assert code == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"pa.torch", "torch.math"}
    assert all(r["status"] == "ok" and float(r["gb_s"]) > 0 and float(r["us_per_token"]) > 0
               for r in rows)


def test_a_failing_provider_is_a_row_with_its_reason():
    from unittest import mock

    from bench import decode

    def broken(case, x):
        raise ValueError("bad plan")

    case = build_cases(["decode"], ["float32"], "cpu", quick=True)[0]
    with mock.patch.object(decode, "decode_providers", lambda: {"broken": broken}):
        rows = decode.run_decode_case(case, list(all_providers().values()), ["fwd"], FAST)
    assert [(r["provider"], r["status"]) for r in rows] == [("broken", "error")]
    assert "ValueError: bad plan" in rows[0]["note"]
