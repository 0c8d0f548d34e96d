#!/usr/bin/env bash
# Create .venv (once) and install filteratom-sd into it, with the extras named by $1 (default: dev,
# the test extras; pass "" for the package alone, as the quickstart does).
# Without an NVIDIA GPU the CPU build of torch is pinned first, so the installer never pulls CUDA packages.
# Packages go through uv when it installs (the same versions as pip in a third of the time), else pip. uv
# byte-compiles at install, as pip does: imports do not write bytecode where PYTHONDONTWRITEBYTECODE is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1-dev}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
UV=()
if "${PIP[@]}" uv 2>/dev/null; then
  UV=(.venv/bin/python -m uv pip install --python .venv/bin/python --compile-bytecode -q)
  for links in ${PIP_FIND_LINKS:-}; do UV+=(--find-links "$links"); done  # where pip finds local wheels, uv looks too
fi
install() {
  if [ ${#UV[@]} -gt 0 ] && "${UV[@]}" "$@"; then return; fi
  "${PIP[@]}" "$@"
}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # uv reads pip's local wheels only through PIP_FIND_LINKS; without them pip finds the CPU build its own way
  if [ -n "${PIP_FIND_LINKS:-}" ]; then install "torch==2.13.0"; else "${PIP[@]}" "torch==2.13.0"; fi
fi
install -e ".${EXTRAS:+[$EXTRAS]}"
