"""C++ built from csrc/'s headers as a host program with nvcc (no GPU) and run: how the tests
check the kernels' index maps on the CPU."""
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def host_program_output(tmp_path: Path, name: str, program: str) -> str:
    """The stdout of `program` (C++ including csrc/ headers), compiled and run; it must exit 0."""
    source = tmp_path / f"{name}.cu"
    source.write_text(program)
    binary = tmp_path / name
    subprocess.run(["nvcc", "-std=c++17", "--expt-relaxed-constexpr", f"-I{CSRC}", "-o",
                    str(binary), str(source)], check=True, capture_output=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    return done.stdout


def has_report_tools() -> bool:
    """nvcc and cuobjdump, as peer_attention.cuda_compile_report finds them."""
    from peer_attention import cuda_compile_report as report

    try:
        report.tool("nvcc"), report.tool("cuobjdump")
    except SystemExit:
        return False
    return shutil.which("nvcc") is not None
