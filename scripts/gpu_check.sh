#!/usr/bin/env bash
# One-shot GPU check (make gpu-check): every stage of scripts/gpu_check.py, results under $OUT
# (default ./gpu_check_out) as each stage finishes; extra arguments go through (--dry-run,
# --stage NAME, --stage-timeout S). Runs with the machine's own python3 + torch + Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
