"""transformers stays an optional extra: importing the package never imports it."""
import subprocess
import sys


def test_import_does_not_pull_in_transformers():
    code = ("import sys, peer_attention, peer_attention.nn, peer_attention.integrations.transformers; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
