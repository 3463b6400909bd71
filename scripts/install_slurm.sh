#!/usr/bin/env bash
# Install the Slurm daemons, client and munge when any is missing (idempotent).
# Used by CI and by tests/slurm.py (only with LAYOUT_SWEEP_INSTALL_SLURM=1 or CI set).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # slurmctld/slurmd/munged live in sbin

missing=0
for b in slurmctld slurmd sbatch munged; do
  command -v "$b" >/dev/null 2>&1 || missing=1
done
[ "$missing" = 0 ] && exit 0

[ "$(id -u)" = 0 ] || { echo "install_slurm.sh: must run as root to apt-get install slurm" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge; } >/tmp/install_slurm.log 2>&1; then
  echo "install_slurm.sh: apt-get failed (see /tmp/install_slurm.log)" >&2; exit 1
fi
