# syntax=docker/dockerfile:1
# One image for both processes: `sidecar serve` (the default) and `sidecar-worker`.
# Build: docker build -t bifrost-container-sidecar:0.1.0 .
# Both stages must use the same base image: the venv's python is a symlink into it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
# Every dependency ships manylinux wheels (amd64 and arm64), so the builder needs no compiler;
# should one ever need building, install build-essential here, never in the final stage.
COPY pyproject.toml README.md /src/
COPY sidecar/ /src/sidecar/
COPY worker/ /src/worker/
# A regular (non-editable) install; pip byte-compiles it, which matters on a read-only root.
RUN /opt/venv/bin/pip install /src

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sidecar
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 8080: the sidecar (SIDECAR_PORT); 9090: the worker's metrics and health (SIDECAR_WORKER_METRICS_PORT).
EXPOSE 8080 9090
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz (see deploy/kubernetes).
ENTRYPOINT ["sidecar"]
CMD ["serve"]
