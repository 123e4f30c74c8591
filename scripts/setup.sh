#!/usr/bin/env bash
# Create .venv and install snapshop. `--dev` also installs what the full test-suite needs
# (pytest, mediapipe's bundled models, Chromium + Playwright, database servers).
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
# torch==2.13.0 resolves to the local CPU wheel on these machines (pinned in pyproject).
if [ "$DEV" = 1 ]; then
  "${PIP[@]}" -e ".[dev]"
else
  "${PIP[@]}" -e .
fi

if [ "$DEV" = 1 ] && [ -f scripts/setup-test-extras.sh ]; then
  bash scripts/setup-test-extras.sh
fi
