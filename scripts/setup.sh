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

# A venv made before issue #16 holds the plain `onnxruntime` beside `onnxruntime-openvino`:
# both write the package `onnxruntime/`, so drop the plain one and restore the other's files.
if .venv/bin/python -m pip show -q onnxruntime-openvino 2>/dev/null \
    && .venv/bin/python -m pip show -q onnxruntime 2>/dev/null; then
  OV_VERSION=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("onnxruntime-openvino"))')
  .venv/bin/python -m pip uninstall -y -q onnxruntime
  "${PIP[@]}" --force-reinstall --no-deps "onnxruntime-openvino==$OV_VERSION"
fi

if [ "$DEV" = 1 ] && [ -f scripts/setup-test-extras.sh ]; then
  bash scripts/setup-test-extras.sh
fi
