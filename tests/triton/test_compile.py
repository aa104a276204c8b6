"""The interpreter runs any Python, so it cannot tell whether the kernels compile: compile them
for sm90 (Hopper) with triton's own ptxas, no GPU needed, in a process without
TRITON_INTERPRET (this one has it set)."""
import os
import subprocess
import sys

import pytest


def test_kernels_compile_for_sm90():
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "peer_attention.triton_kernels.compile_check", "--quick", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "compiled 9 kernel variants" in result.stdout
