# Sourced by scripts/compose_smoke.sh: a Docker engine for the smoke test, and a local base image.
#   smoke_docker_up     use a running daemon ($DOCKER_HOST or /var/run/docker.sock), or install
#                       Debian's docker.io and start one of our own (own data root, exec root,
#                       pidfile and socket; overlay2); smoke_docker_down stops only that one.
#   smoke_base_image    make $PYTHON_IMAGE with debootstrap when it cannot be pulled.
#   smoke_bridge_gateway  print the host's IPv4 address on the default bridge (builds reach it).
# Needs: SMOKE_DIR (state: data root, cached rootfs), log (a function printing a timed line).

DOCKER=${DOCKER:-/usr/bin/docker}   # Debian's client: BuildKit builds without buildx
SMOKE_RUN=/run/lynx-smoke-docker    # our dockerd's exec root, pidfile and socket
SMOKE_DOCKERD_PID=""

smoke_dockerd_runs() {  # a dockerd of ours is running (this run's, or one left by --keep)
  [ -f "$SMOKE_RUN/dockerd.pid" ] && kill -0 "$(cat "$SMOKE_RUN/dockerd.pid")" 2>/dev/null
}

smoke_install() {  # apt-get install the Debian packages named, if their command is missing
  local missing=() pkg cmd
  for pkg in "$@"; do
    cmd=${pkg#*:}; pkg=${pkg%%:*}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "compose-smoke: missing ${missing[*]}; run as root or install them" >&2; return 1
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

smoke_docker_up() {
  smoke_install docker.io:dockerd docker-compose:docker-compose
  if [ -n "${DOCKER_HOST:-}" ] && "$DOCKER" info >/dev/null 2>&1; then
    log "using the Docker daemon at $DOCKER_HOST"; return 0
  fi
  if [ -S /var/run/docker.sock ] && DOCKER_HOST=unix:///var/run/docker.sock "$DOCKER" info >/dev/null 2>&1; then
    export DOCKER_HOST=unix:///var/run/docker.sock
    log "using the running Docker daemon (/var/run/docker.sock)"; return 0
  fi
  local run=$SMOKE_RUN
  mkdir -p "$SMOKE_DIR/docker" "$run"
  export DOCKER_HOST="unix://$run/docker.sock"
  if smoke_dockerd_runs && "$DOCKER" info >/dev/null 2>&1; then  # left by --keep: reuse it
    log "reusing the smoke dockerd left running (pid $(cat "$run/dockerd.pid"))"; return 0
  fi
  log "starting dockerd (data root $SMOKE_DIR/docker, overlay2)"
  dockerd --data-root "$SMOKE_DIR/docker" --exec-root "$run/exec" --pidfile "$run/dockerd.pid" \
    -H "$DOCKER_HOST" --storage-driver overlay2 >"$SMOKE_DIR/dockerd.log" 2>&1 &
  SMOKE_DOCKERD_PID=$!
  local i
  for i in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    kill -0 "$SMOKE_DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  echo "compose-smoke: dockerd did not start; last lines of $SMOKE_DIR/dockerd.log:" >&2
  tail -n 20 "$SMOKE_DIR/dockerd.log" >&2
  return 1
}

smoke_docker_down() {  # only the daemon this script started, by its pid
  [ -n "$SMOKE_DOCKERD_PID" ] || return 0
  log "stopping dockerd (pid $SMOKE_DOCKERD_PID)"
  kill "$SMOKE_DOCKERD_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 30); do kill -0 "$SMOKE_DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  kill -0 "$SMOKE_DOCKERD_PID" 2>/dev/null && kill -9 "$SMOKE_DOCKERD_PID"
  # dockerd leaves its network-namespace mount behind
  grep -o " $SMOKE_RUN/[^ ]*" /proc/mounts | sort -r | while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  done
  SMOKE_DOCKERD_PID=""
}

smoke_bridge_gateway() {
  # IPAM's Gateway, else the bridge interface's own address: a daemon's first start (no docker0,
  # empty network store; every fresh CI machine) leaves Gateway out of the inspect output
  # (moby/moby#26799), though docker0 has its address.
  local gw iface
  gw=$("$DOCKER" network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' | awk '{print $1}')
  if [ -z "$gw" ]; then
    iface=$("$DOCKER" network inspect bridge -f '{{index .Options "com.docker.network.bridge.name"}}')
    gw=$("$PY" - "${iface:-docker0}" <<'EOF'
import fcntl, socket, struct, sys
SIOCGIFADDR = 0x8915  # the interface's IPv4 address (netdevice(7))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
        req = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", sys.argv[1][:15].encode()))
    except OSError as e:
        sys.exit(f"compose-smoke: bridge interface {sys.argv[1]!r} has no IPv4 address: {e}")
print(socket.inet_ntoa(req[20:24]))
EOF
)
  fi
  [ -n "$gw" ] || { echo "compose-smoke: cannot find the host's address on Docker's default bridge" >&2
    return 1; }
  echo "$gw"
}

smoke_base_image() {  # $1: the tag the Dockerfiles build FROM
  local tag=$1 tarball="$SMOKE_DIR/base-rootfs.tar" rootfs="$SMOKE_DIR/rootfs"
  "$DOCKER" image inspect "$tag" >/dev/null 2>&1 && return 0
  if timeout 60 "$DOCKER" pull -q "$tag" >/dev/null 2>&1; then log "pulled $tag"; return 0; fi
  if [ ! -s "$tarball" ]; then
    smoke_install debootstrap:debootstrap
    log "no registry: debootstrap bookworm (minbase + python3) as $tag"
    rm -rf "$rootfs"
    debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      >"$SMOKE_DIR/debootstrap.log" 2>&1 \
      || { tail -n 20 "$SMOKE_DIR/debootstrap.log" >&2; return 1; }
    # Like python:*-slim: pip may install into the system interpreter.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    # The host's extra CAs (TLS-intercepting proxies): Debian's pip and apt use the system store.
    # Commands in the chroot get its own TMPDIR: the host's (e.g. a CI job's own temp
    # folder) does not exist in there, and update-ca-certificates' mktemp failed on it.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" env TMPDIR=/tmp update-ca-certificates >/dev/null
    fi
    chroot "$rootfs" env TMPDIR=/tmp apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  log "docker import $tarball as $tag"
  "$DOCKER" import --change 'CMD ["python3"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' "$tarball" "$tag" >/dev/null
}
