# Lynx policy controller (lynx-policy): the controller side only, no torch, no SGLang.
#   docker build -f docker/controller.Dockerfile -t lynx-controller:0.1.0 .
# Admin token: never in the image. Mount it as a secret file and point
# LYNX_POLICY__ADMIN__TOKEN_FILE at it (compose does), or pass LYNX_ADMIN_TOKEN at run time.
# BuildKit's built-in frontend (no `# syntax=` line); pip mirror / air-gapped builds: build args
# PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, PIP_TRUSTED_HOST (docker/README.md).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: a wheel holding lynx_policy + lynx_protocol (+ the tiny lynx.cpu_compat boot shim
# the wheel's .pth file imports; it is a no-op unless SGLANG_USE_CPU_ENGINE=1) ---------------
FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install hatchling==1.27.0
COPY pyproject.toml README.md lynx_cpu_compat.pth ./
COPY lynx/__init__.py lynx/__init__.py
COPY lynx/cpu_compat lynx/cpu_compat
COPY lynx_protocol lynx_protocol
COPY lynx_policy lynx_policy
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .
# The dependencies, pinned and listed explicitly: the wheel goes in with --no-deps, so torch
# (or anything the runtime side needs) can never be pulled in.
COPY docker/controller-requirements.txt /wheels/requirements.txt
RUN python -m venv /opt/lynx \
    && /opt/lynx/bin/pip install --no-deps -r /wheels/requirements.txt \
    && /opt/lynx/bin/pip install --no-deps /wheels/*.whl \
    && /opt/lynx/bin/pip check \
    && /opt/lynx/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

# --- final: the venv only ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS controller
LABEL org.opencontainers.image.title="lynx-controller" \
      org.opencontainers.image.description="Lynx policy controller (lynx-policy), no torch" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 lynx \
    && useradd --system --uid 10001 --gid lynx --home-dir /home/lynx --create-home lynx \
    && mkdir -p /var/lib/lynx-policy /etc/lynx-policy \
    && chown lynx:lynx /var/lib/lynx-policy
COPY --from=build /opt/lynx /opt/lynx
COPY docker/controller/controller.toml /etc/lynx-policy/controller.toml
COPY --chmod=755 docker/healthcheck.py /usr/local/bin/lynx-healthcheck
ENV PATH=/opt/lynx/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LYNX_HEALTH_URL=http://127.0.0.1:5791/healthz
USER 10001:10001
WORKDIR /var/lib/lynx-policy
VOLUME ["/var/lib/lynx-policy"]
# 5790: ZMQ link (runtimes connect here); 5791: admin API, /healthz, /metrics.
EXPOSE 5790 5791
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["lynx-healthcheck"]
ENTRYPOINT ["lynx-policy"]
CMD ["serve", "--config", "/etc/lynx-policy/controller.toml"]
