#!/usr/bin/env bash
# Set up, then run a sweep. With no arguments: the small real CPU sweep
# (tiny model, 2 ranks over gloo). Arguments are Hydra overrides, e.g.
#   scripts/sweep.sh model=llama_1b3 cluster=local_gpu sweep=h100_single
#   scripts/sweep.sh cluster=h100_80gb hydra/launcher=submitit_slurm
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/layout-sweep "$@"
