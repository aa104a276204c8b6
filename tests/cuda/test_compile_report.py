"""peer_attention.cuda_compile_report: its SASS / ptxas parsing and occupancy arithmetic (CPU),
and one real compile of the head-dim-32 kernels for sm_80 (needs nvcc and cuobjdump)."""

import pytest

from peer_attention import cuda_compile_report as report
from tests.cuda.host_program import has_report_tools

SASS = """
        Function : _ZN14peer_attention14forward_kernelILi32E6__halfEEvNS_15AttentionParamsE
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0020*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0050*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0060*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0070*/                   NOP ;
        /*0080*/               @!P1 BRA `(.L_x_3) 0x40 ;
        /*0090*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*00a0*/                   STL [R1+0x4], R0 ;
        /*00b0*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*00c0*/                   BRA 0x90 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0 ;
"""


def test_main_loop_is_the_shortest_loop_with_the_most_hmma():
    (name, body), = report.parse_sass(SASS).items()
    assert name.startswith("_ZN14peer_attention14forward_kernel") and len(body) == 15
    loop = report.main_loop(body)
    # loops: 0x10-0x30 (1 HMMA), 0x40-0x80 (2 HMMA, 4 instructions without the NOP),
    # 0x90-0xc0 (2 HMMA, 4 instructions); 0xe0 is the trailing self-branch (no HMMA)
    assert (loop.hmma, loop.instructions, loop.ldsm, loop.branches, loop.local) == (2, 4, 1, 1, 0)
    spilling = report.main_loop(body[8:])  # from 0x90 on: the STL loop is the one left
    assert (spilling.hmma, spilling.local) == (2, 1)
    assert loop.per_hmma == 2.0 and loop.ldsm_per_hmma == 0.5
    assert report.main_loop(body[:4]).hmma == 1
    assert report.main_loop(body[:1]).hmma == 0 and report.main_loop(body[:1]).per_hmma is None


def test_ptxas_log_per_function():
    log = """ptxas info    : Compiling entry function '_Zfoo' for 'sm_80'
ptxas info    : Function properties for _Zfoo
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 992 bytes cmem[0]
ptxas info    : Compiling entry function '_Zbar' for 'sm_80'
ptxas info    : Function properties for _Zbar
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]
"""
    infos = report.parse_ptxas(log)
    assert infos["_Zfoo"] == report.PtxasInfo(255, 12, 16, 4096)
    assert infos["_Zbar"] == report.PtxasInfo(40, 0, 0, 0)


def test_blocks_per_sm():
    sm80, sm89 = report.ARCHS["sm80"], report.ARCHS["sm89"]
    # 255 registers x 128 threads: 256 x 32 per warp, 4 warps -> 2 blocks of 65536
    assert report.blocks_per_sm(sm80, 255, 128, 0) == 2
    assert report.blocks_per_sm(sm80, 128, 128, 0) == 4
    assert report.blocks_per_sm(sm80, 255, 128, 99968) == 1  # 2 x (99968 + 1024) > 167936
    assert report.blocks_per_sm(sm89, 255, 128, 82560) == 1
    assert report.blocks_per_sm(sm89, 32, 128, 0) == 12  # 1536 threads
    assert report.blocks_per_sm(sm89, 255, 128, 132736) == 0  # does not fit


def test_arch_names():
    assert report._arch("sm_90") == "sm90a" and report._arch("120") == "sm120"
    with pytest.raises(Exception):
        report._arch("sm70")


@pytest.mark.skipif(not has_report_tools(), reason="needs nvcc and cuobjdump")
def test_real_compile_of_the_head_dim_32_kernels(tmp_path):
    rows = report.report_ours(["sm80"], [32], ["fp16"], tmp_path, jobs=2)
    # the forward up to D = 128 is its own kernel (forward_plain.cuh), one instantiation per
    # feature switch combination; forward_kernel keeps attn_mask, recompute and scale <= 0
    fast = {"forward_plain_kernel"} | {f"forward_plain_kernel {v}" for v in (
        "gate", "bias", "gate+bias", "peer", "bias+peer")}
    assert {r.kernel for r in rows} == fast | {"forward_kernel features",
                                               "forward_kernel features+mask", "bwd_fused_kernel"} | {
        f"{k}_kernel {v}" for k in ("dq", "dkdv") for v in ("plain", "features", "features+mask")}
    for r in rows:
        assert r.head_dim == 32 and r.dtype == "fp16" and r.threads == 128
        assert 0 < r.registers <= 255 and r.spill_bytes == 0, r
        assert r.fits and r.blocks_per_sm >= 1 and r.smem > 0
        assert r.loop["hmma"] > 0 and r.loop["ldsm"] > 0, r
        assert r.loop["instructions"] > r.loop["hmma"]
    plain = {r.kernel.split()[0]: r for r in rows if r.kernel.endswith("plain")}
    features = {r.kernel.split()[0]: r for r in rows if r.kernel.endswith("features")}
    masks = {r.kernel.split()[0]: r for r in rows if r.kernel.endswith("features+mask")}
    for kernel in plain:  # the plain path's loop is shorter: the features are compiled out
        assert plain[kernel].loop["instructions"] < features[kernel].loop["instructions"]
        assert plain[kernel].loop["hmma"] == features[kernel].loop["hmma"]
    for kernel in features:  # and the features one without the attn_mask code
        assert features[kernel].loop["instructions"] < masks[kernel].loop["instructions"]
        assert features[kernel].loop["hmma"] == masks[kernel].loop["hmma"]
    assert "| sm80 | dq_kernel plain | 32 | fp16 |" in report.format_row(plain["dq_kernel"])
    # 32 query rows per warp: twice the mma per key tile, fewer instructions per mma
    fwd = next(r for r in rows if r.kernel == "forward_plain_kernel")
    assert fwd.loop["hmma"] == 2 * features["forward_kernel"].loop["hmma"]
    assert fwd.loop["per_hmma"] < features["forward_kernel"].loop["per_hmma"]
    # the switches: the same tiles as the plain path; far fewer instructions than the runtime
    # branches of forward_kernel features; the bias costs the loop almost nothing
    for r in rows:
        if r.kernel.startswith("forward_plain_kernel "):
            assert r.loop["hmma"] == fwd.loop["hmma"] and r.loop["ldsm"] == fwd.loop["ldsm"], r
            assert r.loop["per_hmma"] < features["forward_kernel"].loop["per_hmma"] / 2, r
            assert r.smem > fwd.smem, r  # PeerTerms
    bias = next(r for r in rows if r.kernel == "forward_plain_kernel bias")
    assert bias.loop["instructions"] <= 1.05 * fwd.loop["instructions"]
    # the fused backward: dK/dV's four products and dQ's one per tile pair (5/4 of dK/dV's mma)
    fused = next(r for r in rows if r.kernel == "bwd_fused_kernel")
    assert 4 * fused.loop["hmma"] == 5 * plain["dkdv_kernel"].loop["hmma"]


def test_instantiation_names():
    describe = report._describe
    assert describe("void peer_attention::forward_plain_kernel<128, __half, false, false, false>"
                    "(peer_attention::AttentionParams)") == ("forward_plain_kernel", 128, "fp16")
    assert describe("void peer_attention::forward_plain_kernel<64, __nv_bfloat16, true, true, "
                    "false>(peer_attention::AttentionParams)") == (
        "forward_plain_kernel gate+bias", 64, "bf16")
    assert describe("void peer_attention::forward_plain_kernel<32, __half, false, true, true>"
                    "(peer_attention::AttentionParams)") == ("forward_plain_kernel bias+peer", 32,
                                                             "fp16")
    assert report._launch_key("forward_plain_kernel gate") == "forward_plain_kernel:features"
    assert report._launch_key("forward_plain_kernel") == "forward_plain_kernel"
    assert report._launch_key("dq_kernel plain") == "dq_kernel"
    assert describe("void peer_attention::forward_kernel<128, __half, false>"
                    "(peer_attention::AttentionParams)") == ("forward_kernel plain", 128, "fp16")
    assert describe("void peer_attention::dkdv_kernel<96, __nv_bfloat16, true>"
                    "(peer_attention::AttentionParams)") == ("dkdv_kernel features", 96, "bf16")
    assert describe("void peer_attention::dq_kernel<64, __half>(peer_attention::AttentionParams)"
                    ) == ("dq_kernel", 64, "fp16")
    assert describe("void peer_attention::dq_kernel<64, __half, true, true>"
                    "(peer_attention::AttentionParams)") == ("dq_kernel features+mask", 64, "fp16")
    assert describe("void peer_attention::dq_kernel<64, __half, true, false>"
                    "(peer_attention::AttentionParams)") == ("dq_kernel features", 64, "fp16")


@pytest.mark.skipif(not has_report_tools(), reason="needs nvcc")
def test_backend_shared_memory_constant_matches_the_kernels(tmp_path):
    """backends/cuda.py declines the hd > 128 backward below BACKWARD_256_SMEM_BYTES: the bytes
    the launchers ask for (read from csrc/ by the report's host probe)."""
    from peer_attention.backends.cuda import BACKWARD_256_SMEM_BYTES

    probe = report.run_host_probe(report.OURS_PROBE, tmp_path, [report.CSRC], "probe")
    smem = {(k, int(d), t): int(b) for k, d, t, b, _ in (line.split() for line in probe.split("\n")
                                                         if line.strip())}
    needed = max(smem[(k, 256, t)] for k in ("dq_kernel", "dkdv_kernel") for t in ("fp16", "bf16"))
    assert needed == BACKWARD_256_SMEM_BYTES
    # every kernel up to D = 192 (and every forward) fits sm_86/89/120's 101376 bytes per block
    assert max(v for (k, d, t), v in smem.items() if d <= 192 or k == "forward_kernel") <= 101376
    assert {d for (k, d, t) in smem if k == "forward_plain_kernel"} == {32, 64, 96, 128}
    assert {d for (k, d, t) in smem if k == "forward_plain_kernel:features"} == {32, 64, 96, 128}
    from peer_attention.backends.cuda import KERNEL_HEAD_DIMS  # mirrors kHeadDims

    assert sorted({d for (k, d, t) in smem}) == list(KERNEL_HEAD_DIMS)


NESTED = """
        Function : _ZN14peer_attention20forward_plain_kernelILi32E6__halfEEvNS_15AttentionParamsE
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0020*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0050*/                   FSEL R8, R8, -INF, P1 ;
        /*0060*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0070*/               @P1 BRA 0x40 ;
        /*0080*/               @P2 BRA 0x10 ;
        /*0090*/                   EXIT ;
"""


def test_main_loop_is_innermost():
    """The plain forward's per-peer loop holds its unmasked and masked tile loops: the report
    counts the inner loop with the most HMMA (ties: the shortest, the unmasked one), not the
    per-peer loop around both."""
    (body,) = report.parse_sass(NESTED).values()
    loop = report.main_loop(body)
    assert (loop.hmma, loop.instructions, loop.branches) == (2, 3, 1)


def test_backward_per_unit_of_work():
    def row(kernel, instructions, arch="sm80"):
        return report.Row(arch, kernel, 128, "fp16", 128, 255, 0, 0, 166912, 1,
                          {"instructions": instructions})

    rows = [row("dq_kernel plain", 600), row("dkdv_kernel plain", 900),
            row("dq_kernel plain", 1, "sm90a"), row("FA2 flash_bwd_dq_dk_dv 64x128 w8", 1000)]
    # 4 warps x (600 + 900) per unit against 8 warps x 1000 per two units
    assert report.backward_per_unit(rows) == 1.5
    assert report.backward_per_unit(rows[:2]) is None
    # the fused kernel: one unit per iteration of a 4-warp block
    assert report.fused_backward_per_unit(rows) is None
    assert report.fused_backward_per_unit(rows + [row("bwd_fused_kernel", 1200)]) == 1.2
