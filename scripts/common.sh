# Shell helpers the set-up and check scripts share (source it; bash, set -euo pipefail).

# need_disk PATH GIB WHAT: fail (rc 1, one clear message) unless the filesystem that holds PATH
# (or its nearest existing parent) has GIB GiB free. A big install that runs out of space half
# way fails much later with pip's "[Errno 28] No space left on device" and leaves a broken tree.
# LYNX_SKIP_DISK_CHECK=1 skips the check (a filesystem whose df figures are wrong).
need_disk() {
  local path=$1 need_gib=$2 what=$3 free_kib free_gib
  [ "${LYNX_SKIP_DISK_CHECK:-0}" = 1 ] && return 0
  while [ ! -e "$path" ]; do path=$(dirname "$path"); done
  free_kib=$(df -Pk "$path" | awk 'NR == 2 {print $4}')
  free_gib=$(( free_kib / 1048576 ))
  if [ "$free_gib" -lt "$need_gib" ]; then
    {
      echo "$what needs about $need_gib GiB free on the filesystem of $path; $free_gib GiB are free."
      echo "  Free space first (the biggest items: a virtualenv is ~11 GiB, build/pyversions ~6 GiB,"
      echo "  the compose smoke test's state ~16 GiB: make clean-venv, rm -rf build,"
      echo "  bash scripts/compose_smoke.sh --clean), or set LYNX_SKIP_DISK_CHECK=1 to try anyway."
    } >&2
    return 1
  fi
}

# pip_filtered PIP_ARGS...: run pip with its known-harmless lines filtered out, keeping pip's
# exit status (a filter alone would hide a failed install behind grep's status).
pip_filtered() {
  "$@" 2>&1 | { grep -v -E "is ignored|^WARNING: Location" || true; } && return 0
  return "${PIPESTATUS[0]}"
}
