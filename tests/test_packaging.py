"""The wheel ships every subpackage: find_packages (setup.py) skips a folder without __init__.py,
which an editable install hides (.ci/wheel_check.sh installs the real wheel in CI)."""
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_folder_of_the_package_is_a_package():
    package = ROOT / "peer_attention"
    folders = {p.parent for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"no __init__.py (left out of the wheel): {missing}"
    found = set(find_packages(str(ROOT), include=["peer_attention", "peer_attention.*"]))
    assert "peer_attention.backends" in found
    assert {".".join(f.relative_to(ROOT).parts) for f in folders} <= found
