"""Which configs the Triton kernels may launch on a device, and when the backend declines: the
selection (configs.select) on measured usage, the decline below sm_80 or where nothing fits
(fake device properties), and the architecture tables."""
import pytest
import torch

from peer_attention.api import sdpa_problem
from peer_attention.backends.triton import TritonBackend
from peer_attention.triton_kernels import configs
from peer_attention.triton_kernels.fit import ARCHS, SMEM_OPTIN, TMEM_COLUMNS, misfit


def _use(shared=1024, tmem=0, trap=False, spills=0):
    return dict(shared=shared, tmem=tmem, trap=trap, spills=spills)


def test_misfit_names_each_limit():
    assert misfit(_use(), 1024) is None
    assert "shared memory" in misfit(_use(shared=1025), 1024)
    assert "tensor-memory" in misfit(_use(tmem=TMEM_COLUMNS + 64), 1 << 20)
    assert "traps" in misfit(_use(trap=True), 1 << 20)


def test_select_never_keeps_what_does_not_fit_and_prefers_no_spills():
    usage = {"big": _use(shared=200_000), "trap": _use(trap=True), "tmem": _use(tmem=576),
             "spills": _use(spills=96), "ok": _use(), "ok2": _use(shared=4096)}
    order = list(usage)
    kept, rejected = configs.select(order, usage.get, 101376, sixteen_bit=True, first_only=False)
    assert kept == ["ok", "ok2"]
    assert set(rejected) == {"big", "trap", "tmem"}
    # autotuning off: the first that fits without spilling
    assert configs.select(order, usage.get, 101376, True, True)[0] == ["ok"]
    # fp32 (no spill rule: its IEEE products may spill at large head dims) keeps the spilling one
    assert configs.select(order, usage.get, 101376, False, True)[0] == ["spills"]
    # only spilling configs fit: keep them rather than nothing
    assert configs.select(["big", "spills"], usage.get, 101376, True, True)[0] == ["spills"]
    kept, rejected = configs.select(["trap", "big"], usage.get, 101376, True, False,
                                    shortcut=False)
    assert kept == [] and "200000 B of shared memory > 101376" in rejected["big"]
    # an allowance (sm_100's two-sweep dK/dV above head dim 128) counts small spills as none
    assert configs.select(order, usage.get, 101376, True, True, spill_ok=96)[0] == ["spills"]
    assert configs.select(order, usage.get, 101376, True, True, spill_ok=95)[0] == ["ok"]
    assert configs.spill_allowance(100, 256) == configs.WIDE_SPILL_ALLOWANCE > 0
    assert configs.spill_allowance(103, 256) > 0  # sm_103/110: sm_100's tables
    assert configs.spill_allowance(100, 128) == configs.spill_allowance(
        90, 256) == configs.spill_allowance(120, 256) == 0


def test_every_architecture_has_candidates_and_limits(monkeypatch):
    assert set(ARCHS) == {80, 86, 89, 90, 100, 120}
    assert SMEM_OPTIN[120] == SMEM_OPTIN[86] == SMEM_OPTIN[89] == 101376
    for arch in ARCHS:
        for kind in configs.KINDS:
            assert configs.candidates(arch, kind), (arch, kind)
    assert [configs.table_arch(a) for a in (80, 86, 87, 89, 90, 100, 103, 110, 120, 121)] == [
        80, 86, 86, 89, 90, 100, 100, 100, 120, 120]
    # dK/dV takes 64-query tiles first where wgmma/tcgen05 run it; sm_80/86/89 pipeline
    for arch in (90, 100):
        assert configs.candidates(arch, "dkdv")[0][0] >= 64
    for arch in (80, 86, 89, 120):
        for kind in ("dq", "dkdv"):
            assert configs.candidates(arch, kind)[0][3] >= 2
    # sm_100 above head dim 128 (16-bit): two-sweep dK/dV tiles and 8-warp forward tiles first
    # (tcgen05 instead of mma.sync); fp32 and other architectures keep their lists
    wide = configs.candidates(100, "dkdv", 2, 256)
    assert wide[0] == (64, 64, 8, 1, 2) and wide[2:] == configs.candidates(100, "dkdv", 2, 128)
    assert configs.candidates(100, "dkdv", 4, 256) == configs.FP32_WIDE_DKDV
    assert configs.candidates(90, "dkdv", 2, 256) == configs.candidates(90, "dkdv", 2, 128)
    assert configs.candidates(100, "fwd", 2, 256)[0] == (64, 64, 8, 2)
    assert configs.candidates(100, "dq", 2, 256) == configs.candidates(100, "dq", 2, 128)
    monkeypatch.setattr(configs, "INTERPRET", False)  # the GPU's autotune configs
    for kind in ("fwd", "dkdv"):  # the autotuner holds them (the pruner orders and picks)
        held = [configs.blocks(c) for c in configs.autotune_configs(kind)]
        assert set(configs.WIDE_TILES[100][kind]) <= set(held)


def _meta_problem(dtype=torch.float16, dim=64, grad=False):
    q = torch.empty(1, 2, 128, dim, dtype=dtype, device="meta", requires_grad=grad)
    return sdpa_problem(q, q, q)


def _reasons(problem):
    """The backend's own reasons (extra_reasons, which not_supported_reasons adds to the
    capability table's): meta tensors stand in for CUDA ones, which this machine lacks."""
    return TritonBackend().extra_reasons(problem)


@pytest.fixture
def fake_device(monkeypatch):
    def set_device(arch, smem=None):
        monkeypatch.setattr(configs, "device_limits",
                            lambda index: (arch, smem or SMEM_OPTIN.get(arch, 101376)))
    return set_device


def test_declines_below_sm80_with_the_reason(fake_device):
    fake_device(75, 65536)
    reasons = _reasons(_meta_problem())
    assert any("7.5 < 8.0" in r for r in reasons), reasons
    fake_device(80)
    assert not _reasons(_meta_problem())


def test_declines_where_no_config_fits(fake_device, monkeypatch):
    monkeypatch.setitem(configs.NO_FIT, 120, {
        ("dkdv", "float32", 256): "smallest config: 116000 B of shared memory > 101376"})
    fake_device(121)  # sm_121 takes sm_120's table
    forward_only = _reasons(_meta_problem(torch.float32, 256))
    assert not forward_only  # the forward fits; the backward is only needed with gradients
    reasons = _reasons(_meta_problem(torch.float32, 256, grad=True))
    assert any("dkdv" in r and "116000" in r for r in reasons), reasons
    assert not _reasons(_meta_problem(torch.float16, 256, True))
    fake_device(90)
    assert not _reasons(_meta_problem(torch.float32, 256, True))


def test_select_shortcut_measures_the_smallest_first():
    measured = []

    def measure(c):
        measured.append(c)
        return _use(shared=c)
    kept, rejected = configs.select([300_000, 200_000, 150_000], measure, 101376, True, True)
    assert kept == [] and measured == [150_000]  # one compile decides: nothing fits
    assert "smallest config does not fit" in rejected[150_000]
    measured.clear()
    kept, _ = configs.select([300_000, 90_000, 50_000], measure, 101376, True, True)
    assert kept == [90_000] and measured == [50_000, 300_000, 90_000]  # each measured once


PRUNER_SCRIPT = r"""
import json, os, sys
from peer_attention.triton_kernels import compile_check as cc, configs
arch = int(sys.argv[1])
problem = cc.family_problem("float_mask", "bf16", 128)
_, fn, args, kwargs = [x for x in cc.kernel_launches(problem, True, arch) if x[0] == "bwd_dq"][0]
configs.device_limits = lambda index: (arch, cc.SMEM_OPTIN[arch])  # a fake device of `arch`

def measure(kernel, a, kw, config, arch_, index):  # as on the device, spills from ptxas
    compiled = configs.compile_launch(kernel, a, kw, config, configs.target(arch_))
    return dict(configs.usage(compiled), spills=configs.ptxas_resources(compiled, arch_)[1])
configs.measure_on_device = measure
prune = configs.make_pruner(fn, "dq")
os.environ[configs.AUTOTUNE_ENV] = "0"
kept = prune(configs.autotune_configs("dq"), dict(zip(fn.arg_names, args)), grid=(1, 1),
             warmup=False, **kwargs)
expected, _ = cc.autotune_off_config(fn, args, kwargs, "dq", arch, True)
print(json.dumps([[configs.blocks(c) for c in kept], configs.blocks(expected)]))
"""


def test_pruner_keeps_the_config_compile_check_selects():
    """The production pruner (its argument handling, ordering and selection) on a fake sm_120,
    the compile measured for real: bf16 dQ at head dim 128 with a float mask, whose first
    config the branch point's model let overflow sm_89's shared memory."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", PRUNER_SCRIPT, "120"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    kept, expected = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(kept) == 1 and kept[0] == expected, (kept, expected)


def test_every_compile_time_flag_is_in_the_autotune_key():
    """A config kept for one flag combination (no mask) must not be reused for another (a float
    mask, whose tile needs more shared memory): each is its own kernel."""
    from peer_attention.triton_kernels import bwd, fwd
    from peer_attention.triton_kernels.launch import Flags

    for kernel in (fwd._attn_fwd, bwd._bwd_preprocess, bwd._bwd_dq, bwd._bwd_dkdv):
        key = configs.tune_key(kernel)
        for flag in ("E_PAD", "EV_PAD", "USE_TMA"):
            assert flag in key, (kernel, flag)
        # the feature flags travel as one constexpr named tuple, F (launch.Flags)
        assert "F" in key and {"MASK_KIND", "HAS_GATE", "F32_DOT"} <= set(Flags._fields), kernel
        assert "TUNE_LEN" in key and "BLOCK_M" not in key


def test_fp32_candidates_are_the_small_tiles():
    for arch in ARCHS:
        for kind in configs.KINDS:
            small = configs.candidates(arch, kind, 4)
            assert small and all(c[0] * c[1] <= 64 * 64 and c[3] <= 2 for c in small)
            assert set(small) <= set(configs.candidates(arch, kind))
            smallest = configs.candidates(arch, kind, 4, 256)
            assert smallest and all(c[0] * c[1] <= 32 * 32 for c in smallest)
