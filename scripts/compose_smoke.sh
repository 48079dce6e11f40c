#!/usr/bin/env bash
# make compose-smoke: build the Docker images for real and bring the CPU compose stack up.
#   scripts/compose_smoke.sh [--cold] [--keep] | --clean
# On a machine without container registries (this project's CI): installs Debian's docker.io and
# docker-compose if missing and starts its own dockerd (stopped at the end) unless one runs;
# makes the base image (python:3.11.11-slim-bookworm) with debootstrap when it cannot be pulled;
# builds a wheelhouse from the host's pip (its mirrors and cache) and serves it to the builds
# (PIP_FIND_LINKS + PIP_NO_INDEX build args: nothing is downloaded inside a build); builds the
# controller image, the runtime-cpu target and a test-only Prometheus image (Debian's package);
# brings up docker/compose.cpu.yaml + docker/compose.smoke.yaml (no Grafana) on 127.0.0.1; runs
# scripts/compose_smoke_check.py; `down`, and checks that no container is left.
#   --cold   start from nothing: delete the state dir (data root, base rootfs, wheelhouse)
#            and a docker0 bridge left by an earlier daemon
#   --keep   leave the stack (and a dockerd it started) running for inspection
#   --clean  only delete the state dir (~16 GiB: the data root with the images, the wheelhouse)
# Needs ~17 GiB free for a cold run or after a dependency change, ~3 GiB otherwise (checked first).
# Environment: LYNX_SMOKE_DIR (state, default /var/lib/lynx-compose-smoke), PYTHON (default
# .venv/bin/python), LYNX_SMOKE_WHEEL_PORT (8471), LYNX_SMOKE_PROJECT (lynx-smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
COLD=0 KEEP=0 CLEAN=0
for arg in "$@"; do
  case "$arg" in
    --cold) COLD=1 ;;
    --keep) KEEP=1 ;;
    --clean) CLEAN=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "compose-smoke: unknown argument '$arg' (use --cold, --keep, --clean)" >&2; exit 2 ;;
  esac
done
SMOKE_DIR=${LYNX_SMOKE_DIR:-/var/lib/lynx-compose-smoke}
PY=${PYTHON:-.venv/bin/python}
PROJECT=${LYNX_SMOKE_PROJECT:-lynx-smoke}
WHEEL_PORT=${LYNX_SMOKE_WHEEL_PORT:-8471}
VERSION=${LYNX_VERSION:-0.1.0}
export LYNX_VERSION=$VERSION DOCKER_BUILDKIT=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
log() { echo "[compose-smoke $(( $(date +%s) - T0 ))s] $*"; }
# shellcheck source=scripts/smoke/docker_env.sh
source scripts/smoke/docker_env.sh
if [ "$CLEAN" = 1 ]; then
  smoke_dockerd_runs && { echo "compose-smoke: --clean: a smoke dockerd still runs; stop it first" >&2; exit 2; }
  echo "compose-smoke: removing $SMOKE_DIR ($(du -sh "$SMOKE_DIR" 2>/dev/null | cut -f1 || echo absent))"
  rm -rf "$SMOKE_DIR"; exit 0
fi
[ -x "$PY" ] || { echo "compose-smoke: $PY missing: run make setup (or set PYTHON)" >&2; exit 2; }
# shellcheck source=scripts/common.sh
source scripts/common.sh

"$PY" -m lynx.deploy generate --check
if [ "$COLD" = 1 ]; then
  smoke_dockerd_runs && { echo "compose-smoke: --cold: a smoke dockerd still runs; stop it first" >&2; exit 2; }
  log "--cold: removing $SMOKE_DIR"; rm -rf "$SMOKE_DIR"
  # docker0 outlives its daemon; a fresh machine has none (and then the first start differs)
  if [ -e /sys/class/net/docker0 ] && ! pgrep -x dockerd >/dev/null; then
    log "--cold: removing the docker0 bridge no daemon uses"; ip link delete docker0
  fi
  T0=$(date +%s)  # times from here on are those of a fresh machine
fi
mkdir -p "$SMOKE_DIR"
COMPOSE=(docker-compose -p "$PROJECT" -f docker/compose.cpu.yaml -f docker/compose.smoke.yaml)
HTTP_PID="" WHEEL_PID="" STACK_UP=0 TIMES=""
cleanup() {
  local rc=$?
  set +e
  if [ "$STACK_UP" = 1 ] && [ "$KEEP" = 0 ]; then
    [ "$rc" = 0 ] || "${COMPOSE[@]}" logs --no-color --tail 40 >"$SMOKE_DIR/stack.log" 2>&1 || true
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    [ "$rc" = 0 ] || echo "compose-smoke: failed; service logs in $SMOKE_DIR/stack.log" >&2
  fi
  for pid in "$HTTP_PID" "$WHEEL_PID"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null; done
  if [ "$KEEP" = 0 ]; then smoke_docker_down; else log "--keep: DOCKER_HOST=$DOCKER_HOST"; fi
  exit "$rc"
}
trap cleanup EXIT
step() { TIMES+="$(printf '%-34s %4ss' "$1" "$2")"$'\n'; }

# --- wheelhouse: everything both images pip-install, from the host's pip (mirrors, cache) ------
WHEELS="$SMOKE_DIR/wheelhouse"
ROUTER=$(grep -o 'SGLANG_ROUTER_VERSION=[0-9.]*' docker/runtime.Dockerfile | cut -d= -f2)
HATCHLING=$(grep -o -m1 'hatchling==[0-9.]*' docker/runtime.Dockerfile)
STAMP=$( (cat pyproject.toml docker/controller-requirements.txt; echo "$ROUTER $HATCHLING") | sha256sum | cut -c1-16)
wheelhouse_current() { [ "$(cat "$WHEELS/.stamp" 2>/dev/null)" = "$STAMP" ]; }
# new dependencies: a new wheelhouse (~4 GiB) and runtime image (~11 GiB) before the old go
if wheelhouse_current; then
  need_disk "$SMOKE_DIR" 3 "compose-smoke"
else
  need_disk "$SMOKE_DIR" 17 "compose-smoke (new wheelhouse and images)"
fi
wheelhouse() {  # in the background, while the daemon starts and the base image is made
  wheelhouse_current && return 0
  log "wheelhouse: pip wheel .[runtime] sglang-router==$ROUTER $HATCHLING + controller pins"
  rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
  "$PY" -m pip wheel -q --wheel-dir "$WHEELS.tmp" ".[runtime]" "sglang-router==$ROUTER" "$HATCHLING"
  "$PY" -m pip wheel -q --no-deps --wheel-dir "$WHEELS.tmp" -r docker/controller-requirements.txt
  rm -f "$WHEELS.tmp"/lynx_moe-*.whl
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS" && echo "$STAMP" >"$WHEELS/.stamp"
}
s=$(date +%s)
wheelhouse >"$SMOKE_DIR/wheelhouse.log" 2>&1 &
WHEEL_PID=$!
smoke_docker_up; step "docker daemon" $(( $(date +%s) - s ))
# a stack left by --keep goes first; then the ports it publishes must be free
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"$PY" - <<'EOF'
import socket, sys, time
from lynx.deploy import constants as c
def busy(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False
for port in (c.ROUTER_PORT, c.CONTROLLER_ADMIN_PORT, c.PROMETHEUS_PORT):
    deadline = time.monotonic() + 60  # another program's test server may hold it briefly
    while busy(port):
        if time.monotonic() > deadline:
            sys.exit(f"compose-smoke: 127.0.0.1:{port} is in use; the stack publishes it")
        time.sleep(2)
EOF
BASE=$("$PY" -c 'from lynx.deploy import constants as c; print(c.PYTHON_IMAGE)')
s2=$(date +%s); smoke_base_image "$BASE"; step "base image ($BASE)" $(( $(date +%s) - s2 ))
wait "$WHEEL_PID" || { grep -v "is ignored" "$SMOKE_DIR/wheelhouse.log" | tail -n 20 >&2
  echo "compose-smoke: building the wheelhouse failed" >&2; exit 1; }
step "wheelhouse ($(du -sh "$WHEELS" | cut -f1), from start)" $(( $(date +%s) - s ))
GATEWAY=$(smoke_bridge_gateway)
"$PY" -m http.server "$WHEEL_PORT" --bind "$GATEWAY" --directory "$WHEELS" >"$SMOKE_DIR/wheel-http.log" 2>&1 &
HTTP_PID=$!
sleep 1; kill -0 "$HTTP_PID" 2>/dev/null || { cat "$SMOKE_DIR/wheel-http.log" >&2
  echo "compose-smoke: cannot serve the wheelhouse on $GATEWAY:$WHEEL_PORT (LYNX_SMOKE_WHEEL_PORT)" >&2; exit 1; }
PIP_ARGS=(--build-arg "PIP_FIND_LINKS=http://$GATEWAY:$WHEEL_PORT/" --build-arg PIP_NO_INDEX=1
          --build-arg "PIP_TRUSTED_HOST=$GATEWAY")

# --- images -------------------------------------------------------------------------------------
build() {  # $1: label, $2: tag, rest: docker build arguments
  local label=$1 tag=$2 s; shift 2; s=$(date +%s)
  log "building $tag"
  "$DOCKER" build --progress=plain -t "$tag" "$@" >"$SMOKE_DIR/build-${tag%%:*}.log" 2>&1 \
    || { tail -n 30 "$SMOKE_DIR/build-${tag%%:*}.log" >&2; return 1; }
  local size; size=$("$DOCKER" image inspect -f '{{.Size}}' "$tag")
  step "$label ($(( size / 1000000 )) MB)" $(( $(date +%s) - s ))
}
build "image lynx-controller" "lynx-controller:$VERSION" "${PIP_ARGS[@]}" -f docker/controller.Dockerfile .
build "image lynx-runtime-cpu" "lynx-runtime-cpu:$VERSION" "${PIP_ARGS[@]}" \
  -f docker/runtime.Dockerfile --target runtime-cpu .
PROM_IMAGE=$("$PY" -c 'from lynx.deploy import constants as c; print(c.SMOKE_PROMETHEUS_IMAGE)')
build "image prometheus (test only)" "$PROM_IMAGE" --build-arg "BASE_IMAGE=$BASE" \
  -f docker/smoke/prometheus.Dockerfile docker/smoke

# --- secrets (kept when present), the stack, the checks, down -----------------------------------
mkdir -p docker/secrets
for name in lynx_admin_token grafana_admin_password; do
  [ -s "docker/secrets/$name" ] || "$PY" -c 'import secrets; print(secrets.token_hex(24))' >"docker/secrets/$name"
done
PYTHON=$PY bash scripts/link_keys.sh 1 >/dev/null
chmod 644 docker/secrets/lynx_admin_token docker/secrets/grafana_admin_password docker/secrets/link/*.key*

s=$(date +%s); log "docker-compose up (runtime-1, router, controller, prometheus)"
STACK_UP=1
"${COMPOSE[@]}" up -d --no-build >"$SMOKE_DIR/compose-up.log" 2>&1 \
  || { cat "$SMOKE_DIR/compose-up.log" >&2; exit 1; }
"$PY" scripts/compose_smoke_check.py --compose "${COMPOSE[*]}" --docker "$DOCKER" \
  --token-file docker/secrets/lynx_admin_token
step "stack up + checks" $(( $(date +%s) - s ))
if [ "$KEEP" = 0 ]; then
  "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1; STACK_UP=0
  left=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  [ -z "$left" ] || { echo "compose-smoke: containers left after down: $left" >&2; exit 1; }
  log "down: no container left"
  # on our own daemon only: images replaced by this run's rebuilds (~11 GB after a dependency
  # change); a daemon that was already running is left as it was
  [[ "$DOCKER_HOST" != *lynx-smoke-docker* ]] || "$DOCKER" image prune -f >/dev/null
fi
step "total" $(( $(date +%s) - T0 ))
printf '%s' "$TIMES" | tee "$SMOKE_DIR/last-run.txt"
log "PASSED"
