#!/usr/bin/env bash
# Bring up (idempotently) a one-node Slurm cluster on this machine, as root.
#   eval "$(scripts/slurm_up.sh [STATE_DIR] | tail -1)"    # sets SLURM_CONF
# Progress goes to stderr; the only stdout line is `export SLURM_CONF=...`.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # daemons live in sbin, not on a user PATH

STATE_DIR="$(mkdir -p "${1:-/tmp/layout-sweep-slurm}" && cd "${1:-/tmp/layout-sweep-slurm}" && pwd)"
CONF="$STATE_DIR/slurm.conf"
export SLURM_CONF="$CONF"            # clients (sinfo, scontrol) and daemons read it
HOST="$(hostname -s)"
log() { echo "slurm_up: $*" >&2; }
die() {
  log "$*"
  for f in "$STATE_DIR"/slurmctld.log "$STATE_DIR"/slurmd.log; do
    [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}
[ "$(id -u)" = 0 ] || die "must run as root (SlurmUser=root, munge key)"
for b in slurmctld slurmd sbatch sinfo scontrol munged munge; do
  command -v "$b" >/dev/null || die "$b not found; run scripts/install_slurm.sh"
done

# A daemon is ours when the pid in its pidfile in STATE_DIR is alive with that name.
alive() { local p; p="$(cat "$STATE_DIR/$1.pid" 2>/dev/null)" || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$1" ]; }
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1; }

# --- munge: slurm's auth. munged refuses a key not owned by the user it runs as,
# so key and run/log/lib dirs belong to munge and munged runs as that user.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
if id munge >/dev/null 2>&1; then
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
fi
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged
  else munged --force; fi   # no munge user: root-owned key, --force skips the checks
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null 2>&1 || die "munged does not answer (see /var/log/munge)"
fi

# --- slurm.conf. NodeAddr/SlurmctldHost pin 127.0.0.1 so a hostname that does not
# resolve (containers, CI) does not matter. CR_CPU: each CPU is a unit, so 1-CPU
# tasks pack; memory is not consumable, so jobs need no --mem.
MEM_MB=$(( $(free -m | awk '/^Mem:/{print $2}') * 9 / 10 ))   # under slurmd's own count, else the node drains
# The node declares at least 8 CPUs (config_overrides makes slurmd take the configured count over
# the hardware's), so an 8-rank CPU trial (tp2*pp2*dp2) can be placed on a 2-core test machine:
# its ranks then share the cores, which is fine for a correctness run and useless for timing.
CPUS=$(( $(nproc) > 8 ? $(nproc) : 8 ))
NEW="$(mktemp)"; trap 'rm -f "$NEW"' EXIT
cat >"$NEW" <<CONF
ClusterName=layoutsweep
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

if cmp -s "$NEW" "$CONF" && alive slurmctld && alive slurmd; then
  # Same config, both daemons up: never restart (that would cancel running jobs); a node
  # in a passing state (down after a slurmd restart, draining) is resumed below.
  log "daemons already running ($CONF)"
else
  # Config changed or a daemon is missing: restart both from a clean slate.
  if alive slurmctld || alive slurmd; then
    log "restarting daemons"; "$(dirname "$0")/slurm_down.sh" "$STATE_DIR" >&2
  fi
  mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool"
  mv "$NEW" "$CONF"; chmod 0644 "$CONF"

  # Ports 6817/6818 are machine-wide: a controller answering now is not ours, and
  # our clients would silently talk to it.
  if scontrol ping 2>/dev/null | grep -q UP; then
    die "another slurmctld already answers on this machine (other STATE_DIR? stop it with slurm_down.sh DIR)"
  fi
  log "starting slurmctld and slurmd ($CONF)"
  slurmctld -f "$CONF" || die "slurmctld failed to start"
  slurmd -f "$CONF" || die "slurmd failed to start"
fi

for i in $(seq 60); do
  sleep 1
  alive slurmctld || die "slurmctld died"
  alive slurmd || die "slurmd died"
  st="$(node_state)"
  log "node $HOST: ${st:-no answer yet} (${i}s)"
  case "$st" in
    idle|mixed|allocated|completing|idle+*|mixed+*|allocated+*|completing+*) echo "export SLURM_CONF=$CONF"; exit 0 ;;
    down|drain*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
done
die "node $HOST not idle after 60 s"
