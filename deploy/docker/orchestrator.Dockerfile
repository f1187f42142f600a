# The orchestrator image (services.orchestrator.server; StatefulSet `orchestrator` in deploy/k8s/orchestrator.yaml).
# Build from the repository root:
#   docker build -f deploy/docker/orchestrator.Dockerfile -t ghcr.io/magic3d/orchestrator:0.1.0 .
# Not built on this project's development machines: they cannot pull base images (no registry access), so this file
# is checked only by tests/test_deploy_manifests.py (paths, user, command), never by a build.
#
# The orchestrator never touches pixels, but the project's one package depends on torch: the CPU build is installed
# first (from PyTorch's CPU index) so that pip does not pull the CUDA build and its libraries.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends bash ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python -m venv /opt/venv && pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml ./
COPY scripts/ scripts/
COPY protos/ protos/
COPY shared/ shared/
COPY services/ services/
COPY deploy/config/ deploy/config/
# /var/lib/magic3d: the job database's directory (a persistent volume in Kubernetes, owned by fsGroup 1000 there).
RUN pip install . \
 && PYBIN=/opt/venv/bin/python scripts/gen_protos.sh \
 && useradd --uid 1000 --create-home --shell /bin/bash magic3d \
 && mkdir -p /var/lib/magic3d \
 && chown -R magic3d /app /var/lib/magic3d

USER 1000
EXPOSE 50051 9090 8080
CMD ["python", "-m", "services.orchestrator.server", "--config", "deploy/config/orchestrator.yaml", "--host", "0.0.0.0"]
