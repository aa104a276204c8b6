"""Build logic of the CUDA extension `peer_attention._C` (called by setup.py).

`cuda_extension(sources, required)` returns (ext_modules, cmdclass) for
torch.utils.cpp_extension, or ([], {}) with a printed reason when no CUDA toolkit or no CUDA build
of torch is at hand (`required=True`, i.e. PEER_ATTENTION_BUILD_CUDA=1, exits loudly instead).

It finds its way on a fresh machine by itself:
- the toolkit: CUDA_HOME / CUDA_PATH when they hold a real toolkit, else the folder the `nvcc` on
  PATH reports (`nvcc --dryrun` prints its _TOP_/_HERE_; a wrapper script outside the toolkit
  misleads torch's own guess, which then fails at link time), else /usr/local/cuda*;
- headers torch's CUDA headers need (ATen/cuda/CUDAContext.h pulls cusparse.h) that a pip
  installed torch ships in site-packages/nvidia/*/include;
- architectures: TORCH_CUDA_ARCH_LIST, else the visible GPU's, else "8.0;9.0a"; PTX of the newest
  portable one is embedded too (with_ptx);
- parallelism: MAX_JOBS (read by torch's ninja build).
Wheels get a local version naming the CUDA and torch versions, e.g. 0.1.0+cu130torch2.11.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_ARCHS = "8.0;9.0a"
# the release wheel's architectures (A100, RTX 30xx/A10, RTX 40xx/L4/L40, H100/H200, B200, RTX 50xx)
# + PTX of 12.0 (with_ptx); CI builds DEFAULT_ARCHS only (.ci/build_cuda.sh; the release wheel:
# .ci/build_release_wheel.sh)
RELEASE_ARCHS = "8.0;8.6;8.9;9.0a;10.0;12.0"
ROOT = Path(__file__).resolve().parent


def _say(message: str):
    print(f"peer_attention: {message}", flush=True)


def _give_up(message: str, required: bool):
    if required:
        sys.exit(f"peer_attention: PEER_ATTENTION_BUILD_CUDA=1 but {message}")
    _say(f"{message}; skipping the CUDA extension (the Triton and reference backends install)")
    return [], {}


def _has_cudart(home: Path) -> bool:
    folders = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    return any(any((home / f).glob("libcudart.so*")) for f in folders)


def _is_toolkit(home) -> bool:
    return home is not None and (home / "bin" / "nvcc").is_file() and _has_cudart(home)


def _toolkit_of_nvcc(nvcc: str):
    """The toolkit folder an nvcc (or a wrapper script around one) really runs from."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.cu"
        probe.write_text("int main() { return 0; }\n")
        try:
            text = subprocess.run([nvcc, "--dryrun", str(probe)], capture_output=True, text=True,
                                  timeout=60).stderr
        except (OSError, subprocess.SubprocessError):
            return None
    found = dict(re.findall(r"#\$ (_TOP_|_HERE_)=(\S+)", text))
    if "_TOP_" in found:
        return Path(found["_TOP_"])
    if "_HERE_" in found:
        return Path(found["_HERE_"]).parent  # _HERE_ is the toolkit's bin/
    return None


def find_cuda_home():
    candidates = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [_toolkit_of_nvcc(nvcc), Path(nvcc).resolve().parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    candidates += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for home in candidates:
        if _is_toolkit(home):
            return home.resolve()
    return None


def nvidia_pip_include_dirs():
    """include/ folders of pip's nvidia packages (cusparse.h and friends for torch's headers)."""
    found = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if not base.is_dir():
            continue
        for include in sorted(base.glob("*/include")):
            if (include / "cusparse.h").is_file() or (include / "cublas_v2.h").is_file():
                found.append(str(include))
    return list(dict.fromkeys(found))


def _arch_list(torch) -> str:
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if chosen:
        return chosen
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return f"{major}.{minor}" + ("a" if major >= 9 else "")
    return DEFAULT_ARCHS


def with_ptx(archs: str) -> str:
    """The arch list with PTX for its newest portable architecture ("8.0;9.0a" -> "8.0+PTX;9.0a"),
    so that newer GPUs (sm_100, sm_120) JIT-compile the kernels instead of failing at the first
    launch. Arch-specific targets ("9.0a") have no forward-compatible PTX; a list that already
    names +PTX, or holds only such targets, is left as it is."""
    entries = [a.strip() for a in archs.replace(" ", ";").split(";") if a.strip()]
    if any(a.endswith("+PTX") for a in entries):
        return ";".join(entries)
    portable = [a for a in entries if re.fullmatch(r"\d+\.\d+", a)]
    if not portable:
        return ";".join(entries)
    newest = max(portable, key=lambda a: tuple(int(x) for x in a.split(".")))
    return ";".join(a + "+PTX" if a == newest else a for a in entries)


def local_version(torch) -> str:
    cuda = (torch.version.cuda or "").replace(".", "")
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"cu{cuda}torch{major}.{minor}"


def _stamp_version(distribution, label: str):
    version = distribution.metadata.version or ""
    if "+" not in version:
        distribution.metadata.version = f"{version}+{label}"


def _version_commands(label: str, build_ext_class):
    """Commands that put the local version label on every metadata the build writes (pip checks
    that the wheel's metadata matches the one it prepared first)."""
    from setuptools.command.egg_info import egg_info

    class EggInfo(egg_info):
        def finalize_options(self):
            _stamp_version(self.distribution, label)
            super().finalize_options()

    commands = {"egg_info": EggInfo, "build_ext": build_ext_class}
    try:
        from setuptools.command.bdist_wheel import bdist_wheel
    except ImportError:  # older setuptools
        try:
            from wheel.bdist_wheel import bdist_wheel
        except ImportError:
            bdist_wheel = None
    if bdist_wheel is not None:
        class BdistWheel(bdist_wheel):
            def finalize_options(self):
                _stamp_version(self.distribution, label)
                super().finalize_options()

        commands["bdist_wheel"] = BdistWheel
    return commands


def cuda_extension(sources, required: bool = False):
    """(ext_modules, cmdclass) building `peer_attention._C` from `sources`, or ([], {})."""
    try:
        import torch
    except ImportError:
        return _give_up("torch is not importable at build time (use pip --no-build-isolation)",
                        required)
    if torch.version.cuda is None:
        return _give_up(f"torch {torch.__version__} is not a CUDA build", required)
    home = find_cuda_home()
    if home is None:
        return _give_up("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)", required)
    # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first, and again after
    os.environ["CUDA_HOME"] = str(home)
    archs = with_ptx(_arch_list(torch))
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(home)
    include_dirs = [str(ROOT / "csrc")] + nvidia_pip_include_dirs()
    label = local_version(torch)
    _say(f"building the CUDA extension with the toolkit {home} for archs {archs!r} "
         f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}), wheel label +{label}")
    extension = cpp_extension.CUDAExtension(
        name="peer_attention._C",
        sources=list(sources),
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"],
        },
    )
    return [extension], _version_commands(label, _shared_objects_build_ext(cpp_extension))


# where every build frontend keeps the compiled objects (ninja's build folder)
OBJECTS_DIR = ROOT / "build" / "cuda-objects"


def _shared_objects_build_ext(cpp_extension):
    """torch's ninja build_ext with one object folder for every frontend. pip's editable install
    builds in a fresh temporary folder each time, so `pip install -e .` then `pip wheel .` (or a
    second `pip install -e .`) would compile every translation unit again; with one folder ninja
    recompiles only what a changed command, source or header touches, and relinks."""

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(OBJECTS_DIR)

    return BuildExt
