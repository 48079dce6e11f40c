#!/usr/bin/env bash
# make setup: the project's virtualenv with lynx (editable) + sglang==0.5.23 and the dev tools.
#   scripts/setup_venv.sh PYTHON VENV
# Checks the free disk first (a new virtualenv is ~11 GiB: torch and the CUDA wheels sglang
# pins come with it even on the CPU), and fails when pip fails instead of going on to a
# half-installed tree. The Makefile touches its stamp only when this succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:?usage: setup_venv.sh PYTHON VENV} VENV=${2:?usage: setup_venv.sh PYTHON VENV}
# shellcheck source=scripts/common.sh
source scripts/common.sh

if [ -f "$VENV/.lynx-installed" ]; then
  need_disk "$VENV" 2 "make setup (updating $VENV)"
else
  need_disk "$VENV" 13 "make setup (a new $VENV: ~11 GiB installed, more while pip unpacks)"
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "installing lynx + sglang==0.5.23 into $VENV (first time: ~5 minutes)"
if ! pip_filtered "$VENV/bin/python" -m pip install -q -e '.[runtime,dev,eval]'; then
  echo "make setup: pip install failed (its error is above); $VENV is incomplete," \
       "make setup installs it again" >&2
  exit 1
fi
"$VENV/bin/python" -c "import sglang, lynx, lynx_policy, lynx_protocol, lm_eval"
