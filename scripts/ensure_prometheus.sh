#!/usr/bin/env bash
# Installs Debian's prometheus server if absent (integration tests start it on 127.0.0.1).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ] && ! command -v sudo >/dev/null 2>&1; then
  echo "prometheus is not installed and this user cannot apt-get install it;" \
       "Prometheus integration tests will be skipped" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
echo "installing Debian package prometheus (integration tests)"
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus
