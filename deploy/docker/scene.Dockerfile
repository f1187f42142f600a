# The scene optimiser image (services.scene.server; StatefulSet `scene` in deploy/k8s/scene.yaml). Build from the
# repository root:
#   docker build -f deploy/docker/scene.Dockerfile -t ghcr.io/magic3d/scene:0.1.0 .
# Not built on this project's development machines: they cannot pull base images (no registry access), so this file
# is checked only by tests/test_deploy_manifests.py (paths, user, command), never by a build.
#
# GPU: torch from PyPI's default index is the CUDA build and carries its CUDA runtime as wheels; the node supplies the
# driver (NVIDIA container toolkit + device plugin). The optional nvdiffrast rasteriser (`.[gpu]`) JIT-compiles a
# CUDA plugin and so needs nvcc, which this slim image lacks: build FROM an nvidia/cuda *-devel image with
# EXTRAS=gpu for it; without it the scene service uses the pure-PyTorch rasteriser.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends bash ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first (the largest layer, cached while only the project changes), then the project and its pinned deps.
RUN python -m venv /opt/venv && pip install --upgrade pip && pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml ./
COPY scripts/ scripts/
COPY protos/ protos/
COPY shared/ shared/
COPY services/ services/
COPY deploy/config/ deploy/config/
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
 && PYBIN=/opt/venv/bin/python scripts/gen_protos.sh \
 && useradd --uid 1000 --create-home --shell /bin/bash magic3d \
 && chown -R magic3d /app

USER 1000
EXPOSE 50061 9090
# The Kubernetes manifest passes its own config (/etc/magic3d/scene.yaml, from the scene-config ConfigMap); this
# default runs the loopback development config on every interface of the container.
CMD ["python", "-m", "services.scene.server", "--config", "deploy/config/scene.yaml", "--host", "0.0.0.0", "--port", "50061"]
