#!/usr/bin/env bash
# Set up, teach the bundled tiny model the castle concept, and sample it (see "What the quickstart does" in README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh ""   # the package alone: no test extras
export HF_HUB_OFFLINE=1
.venv/bin/fa-sd train --concept castle --images assets/concepts/castle --config tiny-prompt-preserving --overwrite
.venv/bin/fa-sd sample --adapter outputs/castle/castle.safetensors \
  --prompt "a <castle> on a red background" --prompt "a <castle> on a blue background" --prompt "a <castle>" \
  -n 4 --seed 0 --grid --out outputs/castle/quickstart
echo "Images: outputs/castle/quickstart"
