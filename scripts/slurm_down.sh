#!/usr/bin/env bash
# Stop the slurmctld and slurmd started by slurm_up.sh from STATE_DIR (idempotent).
# munged is left running: it is shared and harmless.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
STATE_DIR="${1:-/tmp/layout-sweep-slurm}"
export SLURM_CONF="$STATE_DIR/slurm.conf"

# Only pids from this state dir's pidfiles, and only if they still are that daemon.
pid_of() { local p; p="$(cat "$STATE_DIR/$1.pid" 2>/dev/null)" || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$1" ] && echo "$p"; }

pids=""
for d in slurmd slurmctld; do p="$(pid_of "$d")" && pids="$pids $p"; done
[ -z "$pids" ] && { echo "slurm_down: nothing running from $STATE_DIR"; exit 0; }

if pid_of slurmctld >/dev/null; then
  # Cancel this project's jobs (named layout-sweep*, launch/slurm_jobs.py) so their steps
  # do not outlive slurmd. Anyone else's jobs stay: they survive in StateSaveLocation.
  ours="$(squeue -h -o '%i %j' 2>/dev/null | awk '$2 ~ /^layout-sweep/ {print $1}' || true)"
  [ -n "$ours" ] && scancel --quiet $ours 2>/dev/null || true
fi
kill -TERM $pids 2>/dev/null || true
for _ in $(seq 30); do
  left=""; for p in $pids; do [ -d "/proc/$p" ] && left="$left $p"; done
  [ -z "$left" ] && { echo "slurm_down: stopped$pids"; exit 0; }
  sleep 0.5
done
kill -KILL $left 2>/dev/null || true   # did not stop within 15 s
echo "slurm_down: killed$left"
