#!/usr/bin/env bash
# Run CIFAR cells, by default the paper's Table 1, with their presets: one run directory per cell and seed.
#
#   scripts/sweep_cifar.sh [options] [CELL ...] [-- TRAIN_CIFAR_ARGS ...]
#
# `scripts/sweep_cifar.sh --help` lists the cells and options. The sweep itself (arguments, plan, local workers,
# SLURM job array) is sweep.py, free of torch; this entry runs it with $PYTHON (default: python3). The runs'
# interpreter is sweep.py's choice: $PYTHON, else the repository's .venv/bin/python, else python3.
# Exit status: 0 when every run succeeded, 1 when one failed, 2 for a usage error.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: Python interpreter '$PY' not found: set PYTHON=/path/to/python" >&2
    exit 2
fi
# exec: a stop signal sent to the sweep (Ctrl-C, SIGTERM, a SLURM task's stop) reaches sweep.py, which passes it on
exec "$PY" "$REPO/sweep.py" "$@"
