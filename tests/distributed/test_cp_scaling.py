"""The arithmetic of scripts/cp_scaling.py, checked by hand on a small case."""
import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "cp_scaling.py")
_spec = importlib.util.spec_from_file_location("cp_scaling", _PATH)
cp_scaling = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cp_scaling", cp_scaling)  # dataclasses look their module up there
_spec.loader.exec_module(cp_scaling)

# 2 streams x 8 tokens, all pairs, causal, Hq=2, H=1, E=4, Ev=2, 2-byte dtype, on 2 ranks:
# one pair block of 4 x 4 tokens costs 2*1*2*4*4*(4+2) = 384 FLOPs
SIZES = cp_scaling.Sizes(streams=2, tokens=8, batch=1, q_heads=2, kv_heads=1, head_dim=4,
                         value_dim=2, dtype_bytes=2, causal=True, all_pairs=True)


def test_ring_step_by_hand():
    zigzag = cp_scaling.ring_cost(SIZES, 2, "zigzag")
    assert zigzag.step_flops == 2 * 384 / 2 + 2 * 384  # self blocks halved, cross blocks whole
    assert cp_scaling.ring_cost(SIZES, 2, "contiguous").step_flops == 4 * 384
    assert zigzag.step_bytes == 1 * 1 * 2 * 4 * 6 * 2  # B H S (N/W) (E+Ev) bytes = 96
    assert zigzag.bwd_step_bytes == 96 + 48 * 4        # + fp32 dK/dV (48 elements)
    assert zigzag.bwd_step_flops == 2.5 * zigzag.step_flops
    assert cp_scaling.ring_cost(SIZES, 1).step_bytes == 0


def test_ulysses_by_hand():
    cost = cp_scaling.ulysses_cost(SIZES, 2)
    full_pair = 2 * 1 * 2 * 8 * 8 * 6  # 1536
    assert cost.flops == (2 * full_pair / 2 + 2 * full_pair) / 2
    # q, k, v, out of 2 streams x 4 tokens: (Hq + H) * (E + Ev) = 18 per token; half is sent
    assert cost.bytes == 0.5 * (1 * 2 * 4 * 6 * 3) * 2


def test_overlap_verdict_and_totals():
    step = cp_scaling.ring_cost(SIZES, 2, "zigzag")
    tflops = step.step_flops / 1e-3 / 1e12          # one step computes in 1 ms
    gbps = step.step_bytes / 2e-3 / 1e9             # one transfer takes 2 ms
    row = cp_scaling.rows(SIZES, [2], tflops, {"link": gbps})[0]["zigzag"]
    assert row["step_compute_ms"] == pytest.approx(1.0)
    assert row["step_comm_ms"] == pytest.approx(2.0)
    assert row["hidden"] is False and row["fwd_ms"] == pytest.approx(4.0)
    row = cp_scaling.rows(SIZES, [2], tflops, {"link": 4 * gbps})[0]["zigzag"]
    assert row["hidden"] is True and row["fwd_ms"] == pytest.approx(2.0)


def test_script_prints_the_table(capsys):
    cp_scaling.main(["--world", "8"])
    text = capsys.readouterr().out
    assert "3 stream(s) x 65536 tokens" in text and "| 8 | InfiniBand |" in text


def test_ulysses_is_not_applicable_when_heads_do_not_divide():
    assert cp_scaling.rows(SIZES, [2], 300.0, {"link": 50.0})[0]["ulysses"] is None  # H = 1
