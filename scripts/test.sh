#!/usr/bin/env bash
# Set up, start a real one-node SLURM cluster on this machine (root; installs
# Debian's slurm packages if missing), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
  bash scripts/install_slurm.sh
  eval "$(bash scripts/slurm_up.sh | tail -1)"
else
  echo "test: not root, SLURM tests will be skipped" >&2
fi
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
