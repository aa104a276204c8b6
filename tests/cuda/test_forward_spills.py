"""The fast forward's switch instantiations (csrc/forward_plain.cuh) spill nowhere, compiled with
the extension's nvcc flags for the architectures and head dims where they did spill before
(issue 23; ptxas's allocation at 255 registers moves spills with unrelated edits): peer mode at
D = 128 on sm_90a, the bias at D = 128 on sm_100, peer mode and the joint gate + bias at D = 96
on sm_120. fp16 only (bf16 compiles to the same registers and spills: docs/cuda.md); about 20 s
of nvcc. The whole table: `python -m peer_attention.cuda_compile_report`."""

import pytest

from peer_attention import cuda_compile_report as report
from tests.cuda.host_program import has_report_tools

# (architecture, head dim, (gate, bias, peer) switch combinations)
CASES = [
    ("sm90a", 128, [(False, False, True), (False, True, True)]),
    ("sm100", 128, [(False, True, False)]),
    ("sm120", 96, [(False, False, True), (False, True, True), (True, True, False)]),
]


def _source(head_dim, switches):
    flag = {True: "true", False: "false"}
    lines = ['#include "forward.cuh"', '#include "forward_plain.cuh"', "namespace peer_attention {"]
    lines += [f"template __global__ void forward_plain_kernel<{head_dim}, __half, {flag[g]}, "
              f"{flag[b]}, {flag[p]}>(const AttentionParams);" for g, b, p in switches]
    return "\n".join(lines + ["}  // namespace peer_attention", ""])


@pytest.mark.skipif(not has_report_tools(), reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("arch, head_dim, switches", CASES, ids=[f"{a}-hd{d}" for a, d, _ in CASES])
def test_forward_switches_do_not_spill(tmp_path, arch, head_dim, switches):
    source = tmp_path / f"fwd_switches_{arch}_{head_dim}.cu"
    source.write_text(_source(head_dim, switches))
    cubin, log = report.compile_cubin(source, arch, tmp_path, [report.CSRC])
    rows = report.rows_of_cubin(cubin, log, arch, {})
    assert len(rows) == len(switches)
    for r in rows:
        assert r.kernel.startswith("forward_plain_kernel ") and r.head_dim == head_dim, r
        assert 0 < r.registers <= 255 and r.spill_bytes == 0, r
        assert r.loop["local"] == 0 and r.loop["hmma"] == 2 * head_dim, r
