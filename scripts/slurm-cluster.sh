#!/usr/bin/env bash
# A one-node Slurm cluster on loopback for arv-wrap's tests (Debian 12, Slurm 22.05, root,
# no systemd, no cgroups, no slurmdbd).
#
#   slurm-cluster.sh up                install if needed, configure, start, wait until idle
#   slurm-cluster.sh down              stop slurmd, slurmctld and munged (config is kept)
#   slurm-cluster.sh status            sinfo + daemons; exit 0 iff the node is usable
#   slurm-cluster.sh stop-controller   stop only slurmctld (a controller that does not answer)
#   slurm-cluster.sh start-controller  start slurmctld again and wait until the node is usable
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
JOBCOMP_LOG=$LOG_DIR/jobcomp.log
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
WAIT_SECONDS=${SLURM_CLUSTER_WAIT:-60}
CLUSTER_NAME=${SLURM_CLUSTER_NAME:-arvwrap}

die() {
    echo "slurm-cluster: error: $*" >&2
    exit 1
}

log_tail() {  # log_tail FILE: show the end of a log on stderr
    if [[ -r $1 ]]; then
        echo "---- last lines of $1 ----" >&2
        tail -n 25 "$1" >&2
        echo "----" >&2
    else
        echo "(no log at $1)" >&2
    fi
}

fail_with_log() {  # fail_with_log LOG MESSAGE...
    local logfile=$1
    shift
    echo "slurm-cluster: error: $*" >&2
    log_tail "$logfile"
    exit 1
}

node_name() { hostname -s; }

# ---------------------------------------------------------------- processes

# pid_alive PIDFILE NAME: true if the pidfile names a live process called NAME
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$name" ]]
}

# daemon_pids PIDFILE NAME: pids of the daemon (from the pidfile, else by exact name)
daemon_pids() {
    local pidfile=$1 name=$2
    if pid_alive "$pidfile" "$name"; then
        tr -dc '0-9' <"$pidfile"
        echo
    else
        pgrep -x "$name" || true
    fi
}

running() {  # running PIDFILE NAME
    [[ -n $(daemon_pids "$1" "$2") ]]
}

# stop_daemons PIDFILE:NAME...: SIGTERM them all at once, wait up to 10 s, then SIGKILL
# (slurmctld saves its state and takes ~1.5 s to exit, slurmd and munged ~1.5-2 s)
stop_daemons() {
    local spec pidfile name pids="" p i alive
    for spec in "$@"; do
        pidfile=${spec%%:*} name=${spec#*:}
        p=$(daemon_pids "$pidfile" "$name" | tr '\n' ' ')
        pids+=" $p"
    done
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for ((i = 0; i < 100; i++)); do
        alive=""
        for p in $pids; do
            if kill -0 "$p" 2>/dev/null; then alive=1; fi
        done
        [[ -z $alive ]] && break
        sleep 0.1
    done
    for p in $pids; do
        if kill -0 "$p" 2>/dev/null; then
            echo "slurm-cluster: $(cat "/proc/$p/comm" 2>/dev/null) ($p) did not stop on SIGTERM, killing it" >&2
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    for spec in "$@"; do rm -f "${spec%%:*}"; done
}

# ---------------------------------------------------------------- install

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "packages missing (${missing[*]}) and not root to install them"
    echo "slurm-cluster: installing ${missing[*]}" >&2
    # another apt/dpkg may hold the lock right now: wait for it (up to 15 min) rather than fail
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=900 -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold --no-install-recommends)
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >/tmp/slurm-cluster-apt.log 2>&1; then
        echo "slurm-cluster: install failed, running apt-get update first" >&2
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >>/tmp/slurm-cluster-apt.log 2>&1 ||
            fail_with_log /tmp/slurm-cluster-apt.log "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >>/tmp/slurm-cluster-apt.log 2>&1 ||
            fail_with_log /tmp/slurm-cluster-apt.log "apt-get install ${missing[*]} failed"
    fi
    # a package install may have started daemons of its own (not under systemd: usually not)
}

# ---------------------------------------------------------------- munge

munge_up() {
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    # munged refuses a key readable by others, or a key dir writable by others
    chown munge:munge "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
    chmod go-rwx "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 0755 "$MUNGE_RUN"

    if running "$MUNGE_PID" munged && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    stop_daemons "$MUNGE_PID:munged"
    rm -f "$MUNGE_RUN"/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged ||
        fail_with_log "$MUNGE_LOG" "munged did not start"
    local i
    for ((i = 0; i < 50; i++)); do
        if munge -n </dev/null | unmunge >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    fail_with_log "$MUNGE_LOG" "munged started but munge -n | unmunge does not work"
}

# ---------------------------------------------------------------- config

# write_config FILE: the slurm.conf for this machine
write_config() {
    local out=$1 node cpus mem realmem hw topo=""
    node=$(node_name)
    hw=$(slurmd -C 2>/dev/null | head -n 1) || true
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    # the socket/core/thread layout as slurmd sees it (else slurmd logs a mismatch)
    topo=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw") || true
    if [[ -z $cpus ]]; then
        cpus=$(nproc)
        topo=""
    fi
    [[ -n $mem ]] || mem=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    # leave some room so slurmd never finds less memory than configured (that drains the node)
    realmem=$((mem - mem / 20))
    ((realmem > 256)) || realmem=$mem
    cat >"$out" <<EOF
# Written by arv-wrap scripts/slurm-cluster.sh: a one-node test cluster on loopback.
# Edits are overwritten by the next 'slurm-cluster.sh up'.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818

# no cgroups here: track processes by parent pid, no task containment
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none

# allocate cores and memory; a job without --mem gets DefMemPerCPU per cpu, not the whole node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512

# refuse a request no partition can ever satisfy at submit time instead of leaving it pending
EnforcePartLimits=ALL
# schedule immediately when a job is submitted or a slot frees
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0

# memory enforcement without cgroups: poll every second, kill a step over its --mem
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill

# no slurmdbd: final states from 'scontrol show job' (kept MinJobAge s) and a jobcomp file
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG
MinJobAge=300

KillWait=5
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
ReturnToService=2

StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info

NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus ${topo:+$topo }RealMemory=$realmem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$node Default=NO MaxTime=00:05:00 State=UP
EOF
}

# install_config: write slurm.conf if it changed; prints "changed" or "same"
install_config() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    local tmp
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    write_config "$tmp"
    chmod 0644 "$tmp"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        echo same
    else
        mv -f "$tmp" "$CONF"
        echo changed
    fi
}

# ---------------------------------------------------------------- slurm daemons

node_state() {  # the node's state as sinfo shows it (e.g. idle, mixed, down*), or empty
    timeout 10 sinfo -h -n "$(node_name)" -o %T 2>/dev/null | head -n 1 || true
}

start_slurmctld() {
    running "$CTLD_PID" slurmctld && return 0
    rm -f "$CTLD_PID"
    # -i: do not refuse to start over a state file that does not fit the current config
    slurmctld -i || fail_with_log "$CTLD_LOG" "slurmctld did not start"
    local i
    for ((i = 0; i < WAIT_SECONDS * 10; i++)); do
        if timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then return 0; fi
        running "$CTLD_PID" slurmctld || fail_with_log "$CTLD_LOG" "slurmctld exited during start-up"
        sleep 0.1
    done
    fail_with_log "$CTLD_LOG" "slurmctld does not answer 'scontrol ping' after ${WAIT_SECONDS}s"
}

start_slurmd() {
    running "$SLURMD_PID" slurmd && return 0
    rm -f "$SLURMD_PID"
    slurmd -N "$(node_name)" || fail_with_log "$SLURMD_LOG" "slurmd did not start"
}

# wait_usable: wait until the node is idle/mixed/allocated; resume it once if it is down/drained
wait_usable() {
    local i state resumed="" start=$SECONDS
    while ((SECONDS - start < WAIT_SECONDS)); do
        state=$(node_state)
        case $state in
        idle | mixed | allocated | completing) return 0 ;;
        down | drain* | drained | fail*)
            # not responding (*) means slurmd has not registered yet: wait for it
            if [[ -z $resumed ]] && ((SECONDS - start >= 1)); then
                echo "slurm-cluster: node is '$state', resuming it" >&2
                scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
        esac
        running "$SLURMD_PID" slurmd || fail_with_log "$SLURMD_LOG" "slurmd is not running (node state '$state')"
        running "$CTLD_PID" slurmctld || fail_with_log "$CTLD_LOG" "slurmctld is not running (node state '$state')"
        sleep 0.2
    done
    echo "slurm-cluster: error: node $(node_name) is '$(node_state)', not idle, after ${WAIT_SECONDS}s" >&2
    timeout 5 scontrol show node "$(node_name)" >&2 || true
    log_tail "$CTLD_LOG"
    log_tail "$SLURMD_LOG"
    exit 1
}

cmd_up() {
    local t0=$SECONDS changed
    [[ $(id -u) -eq 0 ]] || die "'up' must run as root"
    install_packages
    munge_up
    changed=$(install_config)
    if [[ $changed == changed ]]; then
        if running "$CTLD_PID" slurmctld || running "$SLURMD_PID" slurmd; then
            echo "slurm-cluster: slurm.conf changed, restarting slurmd and slurmctld" >&2
        fi
        stop_daemons "$SLURMD_PID:slurmd" "$CTLD_PID:slurmctld"
    fi
    start_slurmctld
    start_slurmd
    wait_usable
    local out rc=0
    out=$(timeout 60 srun -N1 -t 1 true 2>&1) || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "slurm-cluster: error: smoke check 'srun -N1 true' failed (exit $rc): $out" >&2
        log_tail "$SLURMD_LOG"
        exit 1
    fi
    local cpus mem
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' "$CONF" | head -n 1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' "$CONF" | head -n 1)
    echo "slurm cluster up: $(node_name) cpus=$cpus mem=${mem}MB"
}

cmd_down() {
    stop_daemons "$SLURMD_PID:slurmd" "$CTLD_PID:slurmctld" "$MUNGE_PID:munged"
    echo "slurm cluster down"
}

cmd_status() {
    local d
    for d in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        local name=${d%%:*} pidfile=${d#*:} pids
        pids=$(daemon_pids "$pidfile" "$name" | tr '\n' ' ')
        if [[ -n ${pids// /} ]]; then
            echo "$name: running (pid ${pids% })"
        else
            echo "$name: not running"
        fi
    done
    command -v sinfo >/dev/null || { echo "slurm is not installed"; return 1; }
    # a controller that does not run makes sinfo retry for ~9 s: ask it with a ping first
    if ! timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        echo "slurmctld does not answer: $(timeout 10 scontrol ping 2>&1 | head -n 1)"
        return 1
    fi
    timeout 20 sinfo 2>&1 || true
    local state
    state=$(node_state)
    case $state in
    idle | mixed | allocated | completing)
        echo "node $(node_name): $state"
        return 0
        ;;
    esac
    echo "node $(node_name): '$state' (not usable)"
    return 1
}

cmd_stop_controller() {
    stop_daemons "$CTLD_PID:slurmctld"
    echo "slurmctld stopped"
}

cmd_start_controller() {
    [[ -f $CONF ]] || die "no $CONF: run 'up' first"
    munge_up
    start_slurmctld
    running "$SLURMD_PID" slurmd || start_slurmd
    wait_usable
    echo "slurmctld started: node $(node_name) $(node_state)"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
stop-controller) cmd_stop_controller ;;
start-controller) cmd_start_controller ;;
*)
    echo "usage: $0 up|down|status|stop-controller|start-controller" >&2
    exit 2
    ;;
esac
