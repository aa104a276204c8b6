"""The FLOP formulas of bench/flops.py against hand-computed counts."""
import dataclasses

import pytest

from bench.common import Case
from bench.flops import BACKWARD_FACTOR, case_flops, forward_flops, pair_flops, tflops_per_s


def test_one_stream_is_the_standard_4_BHLSE():
    # 2 * B * H * L * S * (E + Ev) with E == Ev is 4 * B * H * L * S * E
    assert pair_flops(2, 8, 1024, 512, 64, 64) == 4 * 2 * 8 * 1024 * 512 * 64
    assert pair_flops(1, 1, 3, 5, 7, 7) == 4 * 3 * 5 * 7  # 420


def test_different_value_dim():
    assert pair_flops(1, 2, 10, 20, 16, 8) == 2 * 1 * 2 * 10 * 20 * (16 + 8)  # 19200


def test_causal_halves_the_self_pair_only():
    full = pair_flops(1, 1, 100, 100, 32, 32)
    assert pair_flops(1, 1, 100, 100, 32, 32, causal_self=True) == full / 2
    # two streams, all pairs: only (0, 0) and (1, 1) are halved
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    got = forward_flops(1, 1, (10, 20), (10, 20), 4, 4, pairs, is_causal=True)
    per = lambda l, m: 2 * l * m * 8  # noqa: E731
    assert got == per(10, 10) / 2 + per(10, 20) + per(20, 10) + per(20, 20) / 2  # 200+3200+3200+3200


def test_multi_pair_sum_counts_only_attended_pairs():
    case = Case("peer", "t", 2, 4, 4, 16, 16, (8, 4, 2), (8, 4, 2), kind="peer",
                peers=((True, True, False), (False, True, False), (False, False, False)))
    # attended: (0,0) 8x8, (0,1) 8x4, (1,1) 4x4 -> 2*B*Hq*(E+Ev) * (64 + 32 + 16)
    assert case_flops(case, "fwd") == 2 * 2 * 4 * 32 * (64 + 32 + 16)  # 57344
    dense = dataclasses.replace(case, peers=None)
    assert case_flops(dense, "fwd") == 2 * 2 * 4 * 32 * (8 + 4 + 2) ** 2


def test_backward_factor_and_modes():
    case = Case("sdpa", "t", 1, 2, 2, 64, 64, (128,), (128,), is_causal=True)
    fwd = 4 * 1 * 2 * 128 * 128 * 64 / 2
    assert case_flops(case, "fwd") == fwd
    assert BACKWARD_FACTOR == 2.5
    assert case_flops(case, "bwd") == 2.5 * fwd
    assert case_flops(case, "fwd+bwd") == 3.5 * fwd


def test_tflops_per_s():
    assert tflops_per_s(2e12, 1000.0) == pytest.approx(2.0)
    assert tflops_per_s(1e9, 1.0) == pytest.approx(1.0)
