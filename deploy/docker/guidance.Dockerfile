# The guidance tier image: standalone grpcio server by default; also the Ray image for the RayService
# (KubeRay runs `ray start` from PATH). Build from the repository root:
#   docker build -f deploy/docker/guidance.Dockerfile -t ghcr.io/magic3d/guidance:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# bash for the bootstrap script and KubeRay's start command, wget for KubeRay's health probes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash ca-certificates wget \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (cached while only code changes), then the code.
COPY pyproject.toml Makefile ./
COPY scripts/ scripts/
COPY protos/ protos/
COPY shared/ shared/
COPY services/ services/
COPY deploy/config/ deploy/config/
RUN scripts/bootstrap.sh \
 && useradd --uid 1000 --create-home --shell /bin/bash magic3d \
 && mkdir -p /models && chown -R magic3d /app /models

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONPATH=/app \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=67108864 \
    RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=67108864 \
    HF_HOME=/models/hf

USER 1000
EXPOSE 50051 8000 9000
# The default config listens on 127.0.0.1; in a container it must listen on every interface of the container.
CMD ["python", "-m", "services.guidance.standalone", "--config", "deploy/config/guidance.yaml", "--host", "0.0.0.0"]
