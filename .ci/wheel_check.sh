#!/usr/bin/env bash
# The built wheel, installed into a fresh virtualenv outside the checkout, must import and serve
# (editable installs hide a wheel that lacks files). Called by CI after .ci/build_cuda.sh.
# Usage: .ci/wheel_check.sh [python] [wheel_dir]      (default: python, dist/)
#
# Fast: the fresh virtualenv has no pip and downloads nothing. It reuses the pinned torch, numpy
# and triton of `python` through a .pth file naming the folders they live in (a .pth in those
# folders, e.g. an editable install of this checkout, is not read from there), and the wheel is
# installed into it by `python`'s pip (--python). The bench is a tool of the repository, not part
# of the wheel: a copy of bench/ is run from a folder outside the checkout, against the package
# installed from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON="${1:-${PYTHON:-python}}"
WHEEL_DIR="${2:-${WHEEL_DIR:-dist}}"
wheel=$(ls -t "$WHEEL_DIR"/peer_attention-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || { echo "wheel_check: no peer_attention wheel in $WHEEL_DIR" >&2; exit 1; }
wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
start=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/tmp}/peer_attention_wheel_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv --without-pip "$work/venv"
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PYTHON" - "$site/pinned_stack.pth" <<'PY'
import importlib.util, os, sys
pth = sys.argv[1]
folders = []
for name in ("torch", "numpy", "triton"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        continue
    # (in CI this is .venv/ inside the checkout: only its packages are reached through the .pth,
    # not its editable install of this package, whose own .pth is not read from there)
    folder = os.path.dirname(os.path.dirname(spec.origin))
    if folder not in folders:
        folders.append(folder)
open(pth, "w").write("".join(f + "\n" for f in folders))
print("wheel_check: reusing", ", ".join(folders))
PY
"$PYTHON" -m pip --python "$work/venv/bin/python" install -q --no-deps --no-index "$wheel"

cd "$work"
TRITON_INTERPRET=1 "$work/venv/bin/python" - "$ROOT" <<'PY'
import os, sys
root = os.path.realpath(sys.argv[1])
import torch
import peer_attention as pa

where = os.path.realpath(pa.__file__)
assert not where.startswith(root + os.sep), f"imported from the checkout: {where}"
print("wheel_check: peer_attention", pa.__version__, "from", os.path.dirname(where))
gen = torch.Generator().manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
q, k, v = (torch.randn(1, 2, 5, 16, generator=gen).to(device) for _ in range(3))
streams = [q, q[:, :, :3]], [k, k[:, :, :4]], [v, v[:, :, :4]]
want = pa.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference")
want_peer = pa.peer_attention(*streams, backend="reference")
served = []
for name, reason in pa.available_backends().items():
    if reason is not None:
        print(f"wheel_check: {name}: not here ({reason})")
        continue
    out = pa.scaled_dot_product_attention(q, k, v, is_causal=True, backend=name)
    peer = pa.peer_attention(*streams, backend=name)
    err = max((a - b).abs().max().item() for a, b in zip([out, *peer], [want, *want_peer]))
    assert err < 1e-4, f"{name}: max abs error {err}"
    served.append(name)
    print(f"wheel_check: {name}: served SDPA and peer attention (max abs error {err:.1e})")
assert "torch" in served and "reference" in served, served
PY

cp -r "$ROOT/bench" "$work/bench"
rm -rf "$work/bench/out"
"$work/venv/bin/python" -m bench --list --suite sdpa > "$work/bench_list.txt"
"$work/venv/bin/python" - "$work/bench_list.txt" "$ROOT" <<'PY'
import os, sys
listing = open(sys.argv[1]).read()
assert "pa.torch" in listing and "sdpa/" in listing, listing[-2000:]
import peer_attention as pa
assert not os.path.realpath(pa.__file__).startswith(os.path.realpath(sys.argv[2]) + os.sep)
print(f"wheel_check: python -m bench --list ran outside the checkout ({len(listing.splitlines())} lines)")
PY
echo "wheel_check: $(basename "$wheel") OK in $(( $(date +%s) - start )) s"
