#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for tests and CI (run as root).
#
# Idempotent: installs Debian's slurmctld, slurmd, slurm-client and munge if missing, writes
# /etc/slurm/slurm.conf for one node named after `hostname -s` with this machine's CPUs and
# memory, then starts munged, slurmctld and slurmd directly (containers have no init system)
# unless they already run, waits until the node is idle and runs one tiny test job. Prints
# `sinfo` on success; exits non-zero with the reason and the ends of the daemons' logs when the
# cluster does not come up.
#
# Environment:
#   SLURM_MEM_MARGIN_MB  memory kept back from the scheduler (default: 5 % of RAM, >= 512 MB)
#   SLURM_START_TIMEOUT  seconds to wait for the node to become idle (default 90)
#
# Nipype's SLURM plugin names jobs after $LOGNAME, which a CI shell may not set: export
# LOGNAME="${LOGNAME:-$(id -un)}" in the shell that runs the workflows.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
TIMEOUT="${SLURM_START_TIMEOUT:-90}"
NODE="$(hostname -s)"

fail() {
    echo "start-local-slurm: ERROR: $*" >&2
    exit 1
}
die() {  # a daemon problem: show the ends of the logs too
    echo "start-local-slurm: ERROR: $*" >&2
    for log in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -s "$log" ]; then
            echo "---- last lines of $log ----" >&2
            tail -n 15 "$log" >&2
        fi
    done
    exit 1
}
say() { echo "start-local-slurm: $*"; }

[ "$(id -u)" -eq 0 ] || fail "must run as root (it installs packages and starts daemons)"

# 1. Packages ------------------------------------------------------------------------------
missing=()
for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        slurmctld slurmd slurm-client munge >/dev/null || fail "apt-get install of slurmctld slurmd slurm-client munge failed"
fi
for cmd in slurmctld slurmd sbatch sinfo scontrol munged; do
    command -v "$cmd" >/dev/null 2>&1 || fail "$cmd is still missing after installation"
done

# 2. Munge -------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "generating the munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- munged || die "munged failed to start"
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null || die "munge does not authenticate (see /var/log/munge/munged.log)"
fi

# 3. slurm.conf --------------------------------------------------------------------------
cpus="$(nproc)"
mem_total_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
margin_mb="${SLURM_MEM_MARGIN_MB:-$(( mem_total_mb / 20 > 512 ? mem_total_mb / 20 : 512 ))}"
real_memory_mb=$(( mem_total_mb - margin_mb ))
[ "$real_memory_mb" -gt 0 ] || fail "no memory left for jobs (MemTotal ${mem_total_mb} MB, margin ${margin_mb} MB)"

mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
new_conf="$(mktemp)"
cat >"$new_conf" <<CONF
# Written by tools/slurm/start-local-slurm.sh: a one-node test cluster (no slurmdbd, no cgroups).
ClusterName=qmri-local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
SwitchType=switch/none
# Containers have no usable cgroups: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Cores and memory are consumable, so --cpus-per-task and --mem are scheduled; a job without
# --mem gets DefMemPerCPU instead of the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# Memory is enforced by sampling each job's processes (no cgroups): over --mem is killed.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill
# No slurmdbd: completed jobs (with their allocated TRES) go to a text file, and finished jobs
# stay visible to "scontrol show job" for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.log
MinJobAge=900
SchedulerType=sched/backfill
# A job whose dependency failed is cancelled instead of pending forever (SLURMGraph chains).
SchedulerParameters=kill_invalid_depend
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=${STATE_DIR}/slurmctld
SlurmdSpoolDir=${STATE_DIR}/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_memory_mb} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
fi
rm -f "$new_conf"

# 4. Daemons -----------------------------------------------------------------------------
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if running /run/slurmctld.pid && [ "$conf_changed" -eq 1 ]; then
    say "slurm.conf changed: reconfiguring the running daemons"
    scontrol reconfigure || die "scontrol reconfigure failed"
fi
if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld || die "slurmctld failed to start (see $LOG_DIR/slurmctld.log)"
fi
for _ in $(seq 1 30); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 1
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer (scontrol ping)"
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd || die "slurmd failed to start (see $LOG_DIR/slurmd.log)"
fi

state=""
for _ in $(seq 1 "$TIMEOUT"); do
    state="$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*)
            # A node left down by an earlier run (or an unclean stop) is brought back.
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) die "node $NODE is '${state:-unknown}' after ${TIMEOUT} s, not idle: $(scontrol show node "$NODE" 2>&1 | grep -i reason || true)" ;;
esac

running /run/slurmd.pid || die "slurmd is not running (see $LOG_DIR/slurmd.log)"
# The controller may still list a node whose slurmd just died as idle: a real job proves the
# whole chain (munge, slurmctld, slurmd, slurmstepd) works.
if ! timeout 120 sbatch --wait --chdir=/ --output=/dev/null --error=/dev/null --mem=16M \
        --time=1 --job-name=start-local-slurm-check --wrap=true >/dev/null; then
    die "a test job (sbatch --wait --wrap=true) did not complete"
fi

say "cluster up: node $NODE, ${cpus} CPUs, ${real_memory_mb} MB schedulable"
sinfo
