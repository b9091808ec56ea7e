# syntax=docker/dockerfile:1
# The lmforge project image: every Kubeflow Pipelines component, the Ray workers and the Ray Serve
# replicas run this one image.
#
#   docker build -t lmforge:dev .
#   docker build --build-arg BASE_IMAGE=my-registry/python:3.11-slim \
#                --build-arg TORCH_SPEC=torch==2.13.0 \
#                --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t lmforge:dev .
#
# BASE_IMAGE: any Debian-family image with python3 (>= 3.11) and python3-venv. Air-gapped sites
#   build one locally (e.g. with debootstrap + `docker import`) and pass it here.
# TORCH_SPEC: which torch to install; pass a CUDA build's spec for GPU nodes (default: the CPU wheel
#   index so CPU images stay ~1 GB).
# The optional `ca` build secret is a CA bundle for builds behind a TLS-intercepting proxy; it is
#   used by pip during the build only and never stored in a layer.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/lmforge
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY lmforge ./lmforge
RUN --mount=type=secret,id=ca,required=false \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/lmforge/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" && \
    /opt/lmforge/bin/pip install .

FROM ${BASE_IMAGE}
# Run as an unprivileged user; /workspace is where components read and write artifacts.
RUN groupadd --system --gid 10001 lmforge && \
    useradd --system --uid 10001 --gid lmforge --home-dir /workspace --create-home lmforge
COPY --from=build /opt/lmforge /opt/lmforge
COPY configs /opt/lmforge-configs
ENV PATH=/opt/lmforge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    LMFORGE_HOME=/workspace/.lmforge
USER 10001:10001
WORKDIR /workspace
ENTRYPOINT ["lmforge"]
CMD ["--help"]
