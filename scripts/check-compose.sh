#!/usr/bin/env bash
# Validate docker-compose.yml without a Docker engine.
#
#   scripts/check-compose.sh [COMPOSE_FILE]      (default: docker-compose.yml)
#
# 1. Compose's own schema and interpolation check, with Debian's docker-compose (v1.29, Python),
#    which runs `config` without an engine. When it is missing and CI=true, running as root
#    with apt-get, it is installed (without the docker.io it only recommends); otherwise this
#    step is skipped with a note (exit 0).
# 2. Always: the structural checks of scripts/check_compose.py (healthchecks, images, modules
#    named by the commands, outbound networks).
#
# Exits non-zero when either check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

compose_file=${1:-docker-compose.yml}
PYTHON=${PYTHON:-.venv/bin/python}
status=0

if ! command -v docker-compose >/dev/null 2>&1; then
    if [ "${CI:-}" = "true" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "check-compose: installing Debian's docker-compose (CI=true, root)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
    fi
fi

if command -v docker-compose >/dev/null 2>&1; then
    echo "check-compose: docker-compose -f $compose_file config -q ($(docker-compose version --short 2>/dev/null || echo '?'))"
    if docker-compose -f "$compose_file" config -q; then
        echo "check-compose: docker-compose accepts $compose_file"
    else
        echo "check-compose: docker-compose rejects $compose_file" >&2
        status=1
    fi
else
    reason="docker-compose is not on PATH"
    if [ "${CI:-}" != "true" ]; then
        reason="$reason and CI is not 'true' (set CI=true as root to install Debian's docker-compose)"
    elif [ "$(id -u)" != "0" ]; then
        reason="$reason and this is not root, so it cannot be installed"
    elif ! command -v apt-get >/dev/null 2>&1; then
        reason="$reason and there is no apt-get to install it"
    else
        reason="$reason although its installation was attempted"
    fi
    echo "check-compose: SKIPPED the engine-less 'docker-compose config' validation: $reason"
fi

if "$PYTHON" scripts/check_compose.py --file "$compose_file"; then
    :
else
    status=1
fi

exit "$status"
