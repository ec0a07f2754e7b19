# syntax=docker/dockerfile:1
# One image for both processes: `sidecar serve` (the default) and `sidecar-worker`.
# Build (deploy/README.md, "The image"):
#   docker build --build-arg SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" -t bifrost-container-sidecar:0.1.0 .
# Every Python package comes from requirements/*.txt, pinned with hashes (scripts/lock
# regenerates them from pyproject.toml). Both stages must use the same base image: the venv's
# python is a symlink into it. Pin it by digest for bit-for-bit rebuilds:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Set, it makes pip write hash-based .pyc files (PEP 552): no build time inside the image.
ARG SOURCE_DATE_EPOCH
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Every dependency ships manylinux wheels (amd64 and arm64), so the builder needs no compiler;
# should one ever need building, install build-essential here, never in the final stage.
COPY requirements/ /src/requirements/
# The build backend, in a venv of its own that the final stage never receives.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes -r /src/requirements/build.txt
# The runtime dependencies, exactly as locked (pip refuses anything unpinned or unhashed), in a
# layer that project changes do not invalidate.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r /src/requirements/runtime.txt
COPY pyproject.toml README.md /src/
COPY sidecar/ /src/sidecar/
COPY worker/ /src/worker/
# The project itself, without resolving anything more; pip check fails the build if the lock
# does not satisfy pyproject.toml. A regular (non-editable) install, byte-compiled by pip, which
# matters on a read-only root.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist /src \
    && /opt/venv/bin/pip install --no-deps /tmp/dist/*.whl \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG REVISION=unknown
LABEL org.opencontainers.image.title="bifrost-container-sidecar" \
      org.opencontainers.image.description="A caching sidecar for container lookups through the Bifrost AI gateway: sidecar serve (default) or sidecar-worker." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
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
