# Test-only Prometheus image for `make compose-smoke` (docker/compose.smoke.yaml), where no
# container registry is reachable: Debian's `prometheus` package on the local Debian base.
# Deployments use the pinned upstream image (prom/prometheus) from compose*.yaml.
#   docker build -f docker/smoke/prometheus.Dockerfile -t lynx-smoke-prometheus:local docker/smoke
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}
# No service starts inside a build (debootstrap bases lack Debian images' policy-rc.d).
# hadolint ignore=DL3008
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown 65534:65534 /prometheus
# Like the upstream image: runs as nobody, data in /prometheus, compose passes the flags.
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
