# One image for every Switchyard process: web (ASGI gateway), migrate, Celery worker and
# beat, and the reference vendors (real local SLMs). docker-compose.yml picks the command.
#
#   docker build -t switchyard:local .
#   docker run --rm -p 8000:8000 -e DATABASE_URL=... -e REDIS_URL=... -e SECRET_KEY=... switchyard:local
#
# The lock files only hold manylinux x86_64 wheels for the native packages (xllamacpp,
# onnxruntime, ...): build on/for linux/amd64.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    DJANGO_SETTINGS_MODULE=marketplace.settings

# libgomp1: xllamacpp (llama.cpp) links against OpenMP; bookworm-slim does not ship it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid switchyard --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin switchyard

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them. Exactly the Makefile's
# install: uv from PyPI, then the hash-locked sets (the second one without dependencies).
COPY requirements/ requirements/
RUN python3.11 -m venv .venv \
    && .venv/bin/pip install --quiet uv==0.13.9 \
    && .venv/bin/uv pip sync --python .venv/bin/python --require-hashes requirements/lock.txt \
    && .venv/bin/uv pip install --python .venv/bin/python --no-deps --require-hashes \
        -r requirements/nodeps.txt

ENV VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:$PATH \
    SWITCHYARD_VAR_DIR=/app/var \
    SWITCHYARD_MODEL_CACHE=/app/var/models

# The code stays owned by root (read-only for the app); only var/ is writable. var/models
# exists in the image so that a named volume mounted there inherits the ownership.
COPY . .
# Front-end assets from the npm registry, integrity-checked (scripts/fetch_assets.py).
RUN .venv/bin/python scripts/fetch_assets.py
RUN mkdir -p var/models \
    && chown -R switchyard:switchyard var

USER switchyard

EXPOSE 8000
CMD ["uvicorn", "marketplace.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--loop", "uvloop", "--http", "httptools", "--no-proxy-headers", "--timeout-graceful-shutdown", "30"]
