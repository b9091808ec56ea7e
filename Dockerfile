# The lmforge project image: every Kubeflow Pipelines component, the Ray head and workers and the
# Ray Serve replicas run this one image, as the unprivileged user lmforge (uid 10001).
#
#   scripts/build_image.sh                      # here: local base image + local torch wheel (README)
#   DOCKER_BUILDKIT=1 docker build -t lmforge:dev .                               # CPU image
#   DOCKER_BUILDKIT=1 docker build -t lmforge:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 --build-arg TORCH_VARIANT=cu126 .
#   ... --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt   # behind a TLS-intercepting proxy
#
# Build arguments:
#   BASE_IMAGE     any Debian/Ubuntu image; python3 (>= 3.11) and python3-venv are installed with apt
#                  when missing (a CUDA runtime image for GPU nodes, a debootstrapped one air-gapped)
#   TORCH_VARIANT  cpu (default), cu126, cu128, ...: PyTorch's wheel index for that build; "pypi" = PyPI's
#                  default torch (a CUDA build on x86_64)
#   TORCH_SPEC     the torch requirement (default torch==2.13.0)
#   EXTRAS         optional extras of the lmforge package, e.g. "deepspeed" or "deepspeed,eval-harness"
# A torch wheel (or any wheels) placed in a `wheels/` folder of the build context is preferred to the
# index (scripts/build_image.sh passes the local one). The optional `ca` build secret is a CA bundle
# for pip behind a TLS-intercepting proxy: mounted for the pip steps only, never stored in a layer.
# Layers: the environment (torch, then the other dependencies) is built before the source is used, so
# a code change rebuilds only the small lmforge layer; pip's download cache is a BuildKit cache mount
# kept by the engine between builds.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: the OS with python3 + venv (installed only if the base image lacks them) -------------
FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
RUN if ! python3 -c 'import ensurepip, venv, sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi

# ---- requirements: the dependency list read from pyproject.toml (+ EXTRAS). Its own stage: the
# dependency layer below is rebuilt only when this list changes, not on any other pyproject edit.
FROM base AS requirements
ARG EXTRAS=""
COPY pyproject.toml /tmp/
RUN python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
extras = [e for e in '${EXTRAS}'.split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
    > /requirements.txt

# ---- build: a virtual environment in /opt/lmforge (Debian's Python refuses system pip installs) --
FROM base AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_DEFAULT_TIMEOUT=180
RUN python3 -m venv /opt/lmforge
WORKDIR /src
# docker/wheels.md always matches, so the copy succeeds whether or not a wheels/ folder exists.
COPY docker/wheels.md wheels* /wheels/
# 1. torch (the big layer; cached until TORCH_* or the wheels change)
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "${TORCH_VARIANT}" = pypi ]; then index=""; \
    else index="--extra-index-url https://download.pytorch.org/whl/${TORCH_VARIANT}"; fi; \
    /opt/lmforge/bin/pip install --find-links /wheels $index "${TORCH_SPEC}"
# 2. the other dependencies (cached until their list changes)
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/lmforge/bin/pip install --find-links /wheels -r /tmp/requirements.txt

# ---- runtime: the base, the virtual environment, an unprivileged user ----------------------------
FROM base AS runtime
RUN groupadd --system --gid 10001 lmforge && \
    useradd --system --uid 10001 --gid lmforge --home-dir /workspace --create-home --shell /bin/sh lmforge
COPY --from=build /opt/lmforge /opt/lmforge
# lmforge itself: the one layer a code change rebuilds (a few MB; the environment above stays cached).
# The source is a bind mount of the build context, so it leaves nothing behind but the installed package.
RUN --mount=type=bind,target=/src,rw \
    /opt/lmforge/bin/pip install --no-deps --no-build-isolation --no-cache-dir \
        --disable-pip-version-check --root-user-action=ignore /src
COPY configs /opt/lmforge-configs
COPY docker/entrypoint.sh docker/healthcheck.sh /usr/local/bin/
ENV PATH=/opt/lmforge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HOME=/workspace \
    LMFORGE_HOME=/workspace/.lmforge
USER 10001:10001
WORKDIR /workspace
# lmforge serve's port (the chart's probes use /health and /ready on it)
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["healthcheck.sh"]
ENTRYPOINT ["entrypoint.sh"]
CMD ["--help"]
# Last: the labels change on every build (date, revision) and must not invalidate the layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="lmforge" \
      org.opencontainers.image.description="Train, fine-tune, evaluate and serve private domain-specific language models: every pipeline component, Ray node and server of lmforge" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
