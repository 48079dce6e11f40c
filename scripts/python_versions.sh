#!/usr/bin/env bash
# The Pythons users run: SGLang 0.5.23's wheels cover 3.11-3.13; its upstream image and the GPU
# machine run 3.12. Proves, from the built lynx wheel (not the source tree):
#   3.12 and 3.13: the torch-free tests (protocol, controller) pass;
#   3.12: the wheel resolves next to sglang==0.5.23 (pip --dry-run: the upstream image's case),
#         its sglang.srt.plugins entry point loads, and the selection-library tests pass with
#         torch==2.14.1 (the torch sglang 0.5.23 pins).
# Usage: scripts/python_versions.sh   (make python-versions; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="$ROOT/build/pyversions"
PIP_QUIET=(-q --disable-pip-version-check)
mkdir -p "$OUT"
# shellcheck source=scripts/common.sh
source scripts/common.sh
# the 3.12 venv gets torch==2.14.1 with its CUDA wheels (~5.5 GiB) the first time
[ -d "$OUT/py3.12/lib/python3.12/site-packages/torch" ] \
  || need_disk "$OUT" 7 "make python-versions (torch==2.14.1 into $OUT/py3.12)"

find_python() {  # $1 = 3.12: a working interpreter of that minor version (pyenv or PATH)
  local want=$1 candidate
  for candidate in "python$want" $(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$want"*/bin/python 2>/dev/null | sort -V -r); do
    if "$candidate" -c "import sys; assert sys.version.startswith('$want')" 2>/dev/null; then
      command -v "$candidate" || echo "$candidate"; return 0
    fi
  done
  echo "no Python $want found (pyenv install $want)" >&2; return 1
}

echo "== building the lynx wheel"
rm -rf "$OUT/wheel" && pip_filtered .venv/bin/python -m pip wheel "${PIP_QUIET[@]}" --no-deps -w "$OUT/wheel" .
WHEEL=$(ls "$OUT"/wheel/lynx_moe-*.whl)

# The 3.12 resolution (pip --dry-run, ~2 minutes of index reads) runs while the tests run.
resolve_venv="$OUT/py3.12"
[ -x "$resolve_venv/bin/python" ] || "$(find_python 3.12)" -m venv "$resolve_venv"
"$resolve_venv/bin/pip" install "${PIP_QUIET[@]}" --dry-run --ignore-installed \
  --report "$OUT/resolve.json" "${WHEEL}[runtime]" > "$OUT/resolve.log" 2>&1 &
RESOLVE_PID=$!

SIMULATIONS=(
  --deselect "test/test_policy_evidence.py::test_noise_and_stale_windows_cost_less_quality_at_the_same_attainment"
  --deselect "test/test_policy_evidence.py::test_the_bounds_cover_the_true_quantile_at_their_confidence")
for version in 3.12 3.13; do
  python=$(find_python "$version")
  venv="$OUT/py$version"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  echo "== Python $version: torch-free tests from the wheel ($("$venv/bin/python" -V))"
  pip_filtered "$venv/bin/pip" install "${PIP_QUIET[@]}" --force-reinstall --no-deps "$WHEEL"
  pip_filtered "$venv/bin/pip" install "${PIP_QUIET[@]}" "$WHEEL" pytest pytest-timeout hypothesis pyyaml
  (cd "$OUT" && "$venv/bin/python" -c "import lynx_policy, lynx_protocol, lynx; print('imports from', lynx.__file__)")
  # the slow ones (a real Prometheus and its timing, ~50 s per Python) run in `make test`, and
  # so do the two evidence simulations (pure arithmetic, ~55 s per Python on 2026-12-08)
  (cd "$OUT" && "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
    -c "$ROOT/pyproject.toml" -m "not slow" "$ROOT"/test/test_protocol_*.py \
    "$ROOT"/test/test_policy_*.py "${SIMULATIONS[@]}")
done

venv="$OUT/py3.12"
echo "== Python 3.12: the wheel next to sglang==0.5.23 (resolution, as in SGLang's image)"
if ! wait "$RESOLVE_PID"; then
  grep -v "is ignored" "$OUT/resolve.log" >&2; echo "the 3.12 resolution failed" >&2; exit 1
fi
"$venv/bin/python" - "$OUT/resolve.json" <<'EOF'
import json, sys
names = {i["metadata"]["name"].lower(): i["metadata"]["version"]
         for i in json.load(open(sys.argv[1]))["install"]}
assert names.get("sglang") == "0.5.23" and names.get("lynx-moe"), names
print(f"resolved {len(names)} packages: sglang {names['sglang']}, torch {names.get('torch')}")
EOF
echo "== Python 3.12: the sglang.srt.plugins entry point loads from the installed wheel"
(cd "$OUT" && "$venv/bin/python" -c "
from importlib.metadata import entry_points
install = entry_points(group='sglang.srt.plugins')['lynx'].load()
assert install.__module__ == 'lynx.sglang_plugin' and install() is None  # off: registers nothing
print('entry point lynx ->', install.__module__ + ':' + install.__name__)")

echo "== Python 3.12: selection-library tests with torch==2.14.1"
pip_filtered "$venv/bin/pip" install "${PIP_QUIET[@]}" torch==2.14.1 numpy
(cd "$OUT" && "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
  -c "$ROOT/pyproject.toml" "$ROOT"/test/test_selection_*.py "$ROOT"/test/test_triton_selection.py)
echo "python versions: ok"
