"""build_cuda.py, the build logic of peer_attention._C: toolkit discovery behind an nvcc wrapper,
the pip nvidia include folders, the wheel's local version (CPU only)."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import build_cuda  # noqa: E402

REAL_NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(REAL_NVCC is None, reason="no nvcc on PATH")


@needs_nvcc
def test_finds_the_toolkit_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    home = build_cuda._toolkit_of_nvcc(REAL_NVCC)
    assert home is not None and build_cuda._is_toolkit(home)
    wrapper = tmp_path / "bin" / "nvcc"  # a wrapper script outside the toolkit, as on CI
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{home / "bin" / "nvcc"}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert not build_cuda._is_toolkit(tmp_path)  # torch's guess (the wrapper's parent) fails
    assert build_cuda.find_cuda_home() == home.resolve()


def test_cuda_home_from_the_environment_must_be_a_toolkit(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # not a toolkit: ignored
    found = build_cuda.find_cuda_home()
    assert found != tmp_path
    assert found is None or build_cuda._is_toolkit(found)


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build")
def test_pip_nvidia_include_dirs_hold_cusparse():
    pip_nvidia = [Path(p) / "nvidia" for p in sys.path if (Path(p) / "nvidia").is_dir()]
    if not pip_nvidia:
        pytest.skip("torch's CUDA libraries are not pip packages here")
    assert any((Path(d) / "cusparse.h").is_file() for d in build_cuda.nvidia_pip_include_dirs())


def test_wheel_local_version_names_cuda_and_torch():
    class FakeTorch:
        __version__ = "2.11.0+cu130"

        class version:
            cuda = "13.0"

    assert build_cuda.local_version(FakeTorch) == "cu130torch2.11"


def test_arch_list_default_without_gpu(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the default is its architecture")
    assert build_cuda._arch_list(torch) == "8.0;9.0a"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert build_cuda._arch_list(torch) == "8.6"


def test_required_build_fails_loudly_without_a_toolkit(monkeypatch):
    monkeypatch.setattr(build_cuda, "find_cuda_home", lambda: None)
    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build")
    assert build_cuda.cuda_extension(["csrc/binding.cpp"], required=False) == ([], {})
    with pytest.raises(SystemExit, match="no CUDA toolkit found"):
        build_cuda.cuda_extension(["csrc/binding.cpp"], required=True)


def test_ptx_for_the_newest_portable_arch():
    assert build_cuda.with_ptx("8.0;9.0a") == "8.0+PTX;9.0a"
    assert build_cuda.with_ptx("8.0 8.6") == "8.0;8.6+PTX"
    assert build_cuda.with_ptx("8.0+PTX;9.0a") == "8.0+PTX;9.0a"  # already chosen
    assert build_cuda.with_ptx("9.0a") == "9.0a"  # arch-specific only: no portable PTX to add


def test_release_archs_cover_every_served_architecture():
    assert build_cuda.RELEASE_ARCHS == "8.0;8.6;8.9;9.0a;10.0;12.0"
    assert build_cuda.with_ptx(build_cuda.RELEASE_ARCHS) == "8.0;8.6;8.9;9.0a;10.0;12.0+PTX"
    script = Path(build_cuda.__file__).parent / ".ci" / "build_release_wheel.sh"
    assert "build_cuda.RELEASE_ARCHS" in script.read_text()


@needs_nvcc
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build")
def test_every_build_frontend_shares_one_object_folder(tmp_path, monkeypatch):
    """pip's editable install hands build_ext a fresh temporary build folder; the objects must
    still go to OBJECTS_DIR, where `pip wheel .` (and the next editable install) finds them."""
    from setuptools import Distribution

    # cuda_extension exports these two; monkeypatch puts the caller's values back afterwards
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("CUDA_HOME", str(build_cuda.find_cuda_home()))
    ext_modules, cmdclass = build_cuda.cuda_extension(["csrc/binding.cpp"], required=True)
    dist = Distribution({"name": "peer_attention", "ext_modules": ext_modules, "cmdclass": cmdclass})
    command = cmdclass["build_ext"](dist)
    command.build_temp = str(tmp_path / "editable-build-temp")  # what the editable install sets
    command.ensure_finalized()
    assert Path(command.build_temp) == build_cuda.OBJECTS_DIR
    assert command.use_ninja
