#!/usr/bin/env bash
# Create .venv (once) and install filteratom-sd into it, with the extras named by $1 (default: dev,
# the test extras; pass "" for the package alone, as the quickstart does).
# Without an NVIDIA GPU the CPU build of torch is pinned first, so pip never pulls CUDA packages.
# The rest goes through uv when it installs (the same versions as pip, installed and byte-compiled in a third of
# the time; compiled at install, as pip does, because imports do not write bytecode where PYTHONDONTWRITEBYTECODE
# is set), else pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1-dev}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" "torch==2.13.0"
fi
TARGET=(-e ".${EXTRAS:+[$EXTRAS]}")
if "${PIP[@]}" uv 2>/dev/null && .venv/bin/python -m uv pip install --python .venv/bin/python --compile-bytecode -q "${TARGET[@]}"; then
  exit 0
fi
"${PIP[@]}" "${TARGET[@]}"
