# Lynx runtime: SGLang (pinned) + the Lynx plugin, Lynx on by default (LYNX_ENABLED=1).
#   GPU (default target, on the upstream SGLang image):
#     docker build -f docker/runtime.Dockerfile -t lynx-runtime:0.1.0 .
#   Laptop CPU (SGLang's CPU engine from PyPI, the project's tested CPU path):
#     docker build -f docker/runtime.Dockerfile --target runtime-cpu -t lynx-runtime-cpu:0.1.0 .
# Model: mount a checkpoint folder and set MODEL_PATH (build args set the defaults), or give a
# Hugging Face id. Extra container arguments go to sglang.launch_server unchanged.
# BuildKit (Docker >= 23, or DOCKER_BUILDKIT=1 on 20.10) with its built-in Dockerfile frontend:
# no `# syntax=` line, so nothing but the base images comes from a registry.
# Package mirror / air-gapped builds: pip reads PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX,
# PIP_TRUSTED_HOST from build args (docker/README.md, "Air-gapped builds").
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: the lynx wheel (plugin, protocol, controller code), no dependencies resolved ------
FROM ${PYTHON_IMAGE} AS wheel
ARG PIP_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install hatchling==1.27.0
COPY pyproject.toml README.md lynx_cpu_compat.pth ./
COPY lynx lynx
COPY lynx_protocol lynx_protocol
COPY lynx_policy lynx_policy
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- build: the CPU runtime's requirements (the wheel's dependencies + its [runtime] extra),
# read from pyproject.toml alone: the large layer installing them is reused across code changes
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['runtime'], sep='\\n')" \
    > /src/requirements.txt

# --- laptop CPU runtime: python:3.11-slim + sglang==0.5.23 (the wheel's [runtime] extra) -----
FROM ${PYTHON_IMAGE} AS runtime-cpu
ARG PIP_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_TRUSTED_HOST
ARG MODEL_PATH=/models/mixtral-mini
ARG MODEL_NAME=mixtral-mini
ARG SGLANG_ROUTER_VERSION=0.3.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# ~11 GB (torch==2.14.1 from PyPI is the CUDA build): its own layer, keyed by the requirements
RUN --mount=type=bind,from=requirements,source=/src,target=/req \
    pip install -r /req/requirements.txt "sglang-router==${SGLANG_ROUTER_VERSION}"
# then the Lynx wheel alone; pip check proves its requirements are all met
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl && pip check \
    && python -c "import sglang, sglang_router, lynx.sglang_plugin"
RUN groupadd --system --gid 10001 lynx \
    && useradd --system --uid 10001 --gid lynx --home-dir /home/lynx --create-home lynx \
    && mkdir -p /home/lynx/.cache/huggingface && chown -R lynx:lynx /home/lynx/.cache
COPY --chmod=755 docker/runtime-entrypoint.sh /usr/local/bin/lynx-runtime-entrypoint
COPY --chmod=755 docker/healthcheck.py /usr/local/bin/lynx-healthcheck
# The selection step runs eagerly here: this slim image has no C++ compiler for Inductor
# (`lynx.selection.compiled`); add g++ in a derived image and set LYNX_COMPILE=1 to compile it.
LABEL ai.lynx.selection-step="eager (no C++ compiler; LYNX_COMPILE=0)"
ENV LYNX_ENABLED=1 \
    LYNX_COMPILE=0 \
    SGLANG_USE_CPU_ENGINE=1 \
    MODEL_PATH=${MODEL_PATH} \
    MODEL_NAME=${MODEL_NAME} \
    PORT=30000 \
    LYNX_HEALTH_URL=http://127.0.0.1:30000/health \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/lynx
EXPOSE 30000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["lynx-healthcheck"]
ENTRYPOINT ["lynx-runtime-entrypoint"]
# SGLang's CPU engine flags (see the main README, "The CPU default").
CMD ["--device", "cpu", "--attention-backend", "torch_native", "--max-total-tokens", "4096", "--sleep-on-idle"]

# --- GPU runtime (default target): the upstream SGLang image, nothing of it reinstalled -------
FROM ${SGLANG_IMAGE} AS runtime
ARG PIP_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_TRUSTED_HOST
ARG MODEL_PATH=/models/model
ARG MODEL_NAME=lynx-moe
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Everything already installed is a constraint: pip may add lynx's few pure-Python
# dependencies but can never replace torch, sglang or anything else the image ships.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python3 -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > /tmp/keep.txt \
    && python3 -m pip install --constraint /tmp/keep.txt /wheels/*.whl \
    && rm /tmp/keep.txt \
    && python3 -c "import sglang, torch, lynx.sglang_plugin; print('sglang', sglang.__version__, 'torch', torch.__version__)"
RUN (getent group 10001 >/dev/null || groupadd --system --gid 10001 lynx) \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/lynx \
       --create-home lynx \
    && mkdir -p /home/lynx/.cache/huggingface && chown -R 10001:10001 /home/lynx/.cache
COPY --chmod=755 docker/runtime-entrypoint.sh /usr/local/bin/lynx-runtime-entrypoint
COPY --chmod=755 docker/healthcheck.py /usr/local/bin/lynx-healthcheck
# On CUDA the selection step runs as Lynx's Triton kernels inside SGLang's CUDA graphs.
LABEL ai.lynx.selection-step="triton kernels (CUDA graphs)"
ENV LYNX_ENABLED=1 \
    MODEL_PATH=${MODEL_PATH} \
    MODEL_NAME=${MODEL_NAME} \
    PORT=30000 \
    LYNX_HEALTH_URL=http://127.0.0.1:30000/health \
    HF_HOME=/home/lynx/.cache/huggingface \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/lynx
EXPOSE 30000
# Large checkpoints take minutes to load and compile: a generous start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 CMD ["lynx-healthcheck"]
ENTRYPOINT ["lynx-runtime-entrypoint"]
CMD []
