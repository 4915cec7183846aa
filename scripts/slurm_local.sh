#!/usr/bin/env bash
# A one-machine SLURM (Debian's slurm-wlm and munge) for the tests and CI: this machine is the controller and
# its only node, with one default partition. Needs root.
#
#   scripts/slurm_local.sh start [--install]   start munged, slurmctld and slurmd (install the packages first
#                                              with --install when sbatch is missing); prints the state folder
#                                              (also when they are up already; then it starts nothing)
#   scripts/slurm_local.sh stop                stop the daemons this script started
#
# State lives in $SLURM_LOCAL_DIR (default /tmp/dividemix-slurm): slurm.conf, spool folders, pid files, logs.
# An existing /etc/slurm/slurm.conf is left alone: the daemons and commands are pointed at ours by SLURM_CONF.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/dividemix-slurm}
CONF=$STATE/slurm.conf

fail() {
    echo "error: $1" >&2
    exit 2
}

install_packages() {
    command -v sbatch >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || fail "sbatch is missing and there is no apt-get to install slurm-wlm"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys these: a shell with OMP_NUM_THREADS=1 would get a 1-CPU node
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log"
    cat >"$CONF" <<EOF
ClusterName=dividemix
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ReturnToService=2
MinJobAge=600
KillWait=30
# a requeued job waits this long before it may start again (default 120 s)
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [[ ${1:-} == --install ]] && install_packages
    command -v sbatch >/dev/null 2>&1 || fail "sbatch is missing: install slurm-wlm and munge (or pass --install)"
    if [[ -s $CONF ]] && SLURM_CONF=$CONF sinfo -h >/dev/null 2>&1; then
        echo "$STATE"  # already up
        return 0
    fi
    ((EUID == 0)) || fail "the local SLURM runs its daemons as root"
    write_conf
    if ! pgrep -x munged >/dev/null; then
        [[ -s /etc/munge/munge.key ]] || mungekey -c -f >/dev/null 2>&1 || mungekey -c >/dev/null
        mkdir -p /run/munge
        munged --force 2>/dev/null
        touch "$STATE/started_munged"
    fi
    SLURM_CONF=$CONF slurmctld
    SLURM_CONF=$CONF slurmd
    for _ in $(seq 60); do
        if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "$STATE"
            return 0
        fi
        sleep 0.5
    done
    fail "the local SLURM did not come up: see $STATE/log"
}

stop() {
    local f
    for f in slurmd slurmctld; do
        if [[ -s $STATE/$f.pid ]]; then
            kill "$(cat "$STATE/$f.pid")" 2>/dev/null || true
        fi
    done
    if [[ -e $STATE/started_munged ]]; then
        pkill -x munged || true
        rm -f "$STATE/started_munged"
    fi
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop ;;
    *) fail "usage: scripts/slurm_local.sh start [--install] | stop" ;;
esac
