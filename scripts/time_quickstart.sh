#!/usr/bin/env bash
# Time the quickstart as a new user meets it: a fresh clone of this repository's HEAD in a temporary folder,
# set-up included. Every output line is stamped with the seconds since the start (progress bars left out),
# then the total and the monitor's own numbers are printed. With a folder argument the run's outputs are
# copied there (e.g. for `python scripts/measure_quickstart.py FOLDER/castle.safetensors`).
#
#     bash scripts/time_quickstart.sh [OUTPUTS_FOLDER]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
start=$(python3 -c "import time; print(time.time())")
stamp='import sys, time
start = float(sys.argv[1])
for line in sys.stdin:
    if "it/s" not in line:
        print(f"{time.time() - start:7.1f} {line}", end="", flush=True)'
bash scripts/quickstart.sh 2>&1 | stdbuf -o0 tr '\r' '\n' | python3 -u -c "$stamp" "$start"
python3 - "$start" outputs/castle/monitor.json <<'PY'
import json, sys, time
monitor = json.load(open(sys.argv[2]))
print(f"total {time.time() - float(sys.argv[1]):.1f} s; training loop {monitor['training_seconds']:.1f} s, "
      f"monitor {monitor['monitor_seconds']:.1f} s ({100 * monitor['monitor_share']:.1f} %), kept step {monitor['kept']['step']}")
PY
if [ $# -gt 0 ]; then
  mkdir -p "$1" && cp -r outputs/castle/. "$1"
fi
