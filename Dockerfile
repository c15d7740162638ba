# syntax=docker/dockerfile:1
#
# leadrouter: one image for every `leadrouter` command.
#   docker build -t leadrouter .
#   docker run --rm leadrouter --help
#   docker run --rm -e LEADROUTER_DATABASE_URL=... leadrouter migrate
#   docker run --rm -e LEADROUTER_DATABASE_URL=... -e LEADROUTER_AMQP_URL=... leadrouter   # worker

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: install the package (not editable) into a self-contained venv -------------
FROM ${PYTHON_IMAGE} AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Same path as in the final stage: a venv's scripts carry absolute shebangs.
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /src
# README.md is the project's `readme` in pyproject.toml, so the build needs it.
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY schemas/ schemas/
# Installed inside the package (worker/migrations), so the image needs no copy of its own.
COPY migrations/ migrations/
RUN pip install .

# --- final: the venv and a non-root user -------------------------------------------------
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:$PATH"

RUN groupadd --system --gid 10001 leadrouter \
    && useradd --system --uid 10001 --gid leadrouter --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin leadrouter

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app

# /metrics, /healthz, /readyz (LEADROUTER_METRICS_PORT); reachable from outside the container.
ENV LEADROUTER_METRICS_HOST=0.0.0.0
EXPOSE 9100

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# Exec form: leadrouter is PID 1 and receives SIGTERM itself (the worker drains on it).
ENTRYPOINT ["leadrouter"]
CMD ["worker"]
