"""Build of peer_attention.

Always installs the Python package (with the Triton kernels as `peer_attention.triton_kernels`).
The CUDA extension `peer_attention._C` is built from csrc/ when a CUDA toolkit and a CUDA build of
torch are present; PEER_ATTENTION_BUILD_CUDA=0 skips it, =1 forces it (failing loudly when it
cannot be built). torch is imported only to build the extension, which is why installs use
`pip install --no-build-isolation` (the build must see the torch it will run against).
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _cuda_sources():
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))


def _want_cuda():
    flag = os.environ.get("PEER_ATTENTION_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"PEER_ATTENTION_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return flag


def _extensions():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a message saying why not."""
    flag = _want_cuda()
    if flag == "0":
        print("peer_attention: PEER_ATTENTION_BUILD_CUDA=0, skipping the CUDA extension")
        return [], {}
    sources = _cuda_sources()
    if not sources:
        message = "no CUDA sources (csrc/*.cu, *.cpp) in this source tree"
        if flag == "1":
            sys.exit(f"peer_attention: PEER_ATTENTION_BUILD_CUDA=1 but {message}")
        print(f"peer_attention: {message}; installing without the CUDA extension (the triton, "
              "torch and reference backends)")
        return [], {}
    # PEP 517 builds (pip) do not put the project root on sys.path; build_cuda.py lives there
    sys.path.insert(0, str(ROOT))
    from build_cuda import cuda_extension  # csrc build logic, kept out of this file

    return cuda_extension(sources, required=(flag == "1"))


ext_modules, cmdclass = _extensions()

setup(
    name="peer_attention",
    version="0.1.0",
    description="Fused multi-stream peer attention and a drop-in SDPA, in Triton and CUDA C++",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # triton_kernels/ ships inside the package: a top-level `triton_kernels` is another PyPI project
    packages=find_packages(include=["peer_attention", "peer_attention.*"]) + ["peer_attention.triton_kernels"],
    package_dir={"peer_attention.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis"],
        "bench": ["matplotlib", "tqdm"],
        "transformers": ["transformers"],
        "diffusers": ["diffusers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
