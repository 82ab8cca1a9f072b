# syntax=docker/dockerfile:1
# sse-relay: `python -m service` on python:3.11-slim, as a non-root user.
#   docker build -t sse-relay .
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://host:6379/0 sse-relay
# Two stages: the build stage installs the project and its dependencies into a virtualenv (all of them ship
# manylinux wheels, so no compiler is needed); the runtime stage copies only that virtualenv and the chat page.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# The chat page is package data (pyproject.toml maps frontend/ into the package): the build needs it.
COPY frontend ./frontend
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
# HOST/PORT: listen on every interface of the container. FRONTEND_DIR: the page lives next to the app, not in
# site-packages where the installed package looks by default.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    FRONTEND_DIR=/app/frontend
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-log-init --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /opt/venv /opt/venv
COPY frontend /app/frontend
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it without looking the name up.
USER 10001:10001
EXPOSE 8000
# The service drains on SIGTERM (readiness 503, streams closed over DRAIN_GRACE) and exits 0: give it
# DRAIN_GRACE plus a margin before the SIGKILL (compose: stop_grace_period; Kubernetes:
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# Liveness only (is the process answering?): python, since the slim image has no curl or wget.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "service"]
