# syntax=docker/dockerfile:1
#
# The CDC pipeline image: `python -m dataflow` (Bytewax, recovery on) as uid 10001.
#
#   docker build -t mongo-delta-cdc:0.1.0 .
#   docker run --rm -v cdc-data:/data -e CDC_KAFKA_BROKERS=... mongo-delta-cdc:0.1.0 [-i 0 -a "h0:2101;h1:2101"]
#
# Base image: pinned to an exact Python patch release and Debian release. It is
# NOT pinned by digest: no container registry is reachable from where this file
# was written, so no digest could be looked up. Pin it in your build pipeline,
# e.g. `FROM python:3.11.14-slim-bookworm@sha256:<digest>` (`docker buildx
# imagetools inspect python:3.11.14-slim-bookworm` prints it), and let a bot
# (Renovate/Dependabot) bump tag and digest together.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtualenv with the package and its pinned dependencies --------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A C compiler for dataflow/_speedups.c (the parse step's hot loops); only this stage has it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what `pip install .` needs (see .dockerignore): the runtime dependencies
# are pinned in pyproject.toml; the dev extra (pytest, ruff, ...) is not installed.
COPY pyproject.toml setup.py README.md ./
COPY dataflow ./dataflow
RUN pip install . \
    && python -c "import dataflow._speedups" \
    && python -m compileall -q /opt/venv/lib \
    && pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true

# --- runtime -----------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mongo-delta-cdc" \
      org.opencontainers.image.description="Bytewax dataflow: MongoDB change events (Debezium, via Kafka) to Delta Lake on S3/MinIO"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data/recovery /data/dlq \
    && chown -R 10001:10001 /data

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CDC_RECOVERY_DIR=/data/recovery \
    CDC_DLQ_FALLBACK=/data/dlq/fallback.jsonl \
    BYTEWAX_DATAFLOW_API_PORT=3030

# Recovery store (SQLite) and the dead-letter fallback file live here: keep it
# on a volume, or a restart re-reads more and a fallback file is lost.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

# Bytewax's dataflow API (/dataflow) and Prometheus metrics (/metrics), served
# when BYTEWAX_DATAFLOW_API_ENABLED is set (any value). Clusters also need the
# `-a` port of each process (e.g. 2101), which is chosen at run time.
EXPOSE 3030

# With the API enabled, healthy = the API answers. Without it there is nothing
# to ask, and the check passes (the container stops when the dataflow stops).
# The start period covers topic discovery and waiting for the other processes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; os.environ.get('BYTEWAX_DATAFLOW_API_ENABLED') is None and sys.exit(0); u.urlopen('http://127.0.0.1:%s/dataflow' % os.environ.get('BYTEWAX_DATAFLOW_API_PORT', '3030'), timeout=4)"]

# SIGTERM drains (open batches are committed) within CDC_SHUTDOWN_GRACE_SECONDS
# (60 s by default): give `docker stop` / Kubernetes more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "dataflow"]
