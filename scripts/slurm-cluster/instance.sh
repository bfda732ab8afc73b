# Sourced by scripts/slurm-cluster.sh: which cluster this is (the instance), where its
# files live, and small helpers for messages and processes.
#
# The default instance is the one the Slurm commands find with no SLURM_CONF
# (/etc/slurm/slurm.conf). A named instance (SLURM_CLUSTER_INSTANCE=NAME, or
# SLURM_CONF=/etc/slurm-NAME/slurm.conf) is a second, independent cluster on the same
# machine: its own config, ports, spool, logs, pid files, cluster name, bridge,
# addresses and node names; munged is shared.

instance_from_env() {  # prints the instance name ("" for the default one)
    local name=${SLURM_CLUSTER_INSTANCE:-}
    if [[ -z $name && -n ${SLURM_CONF:-} ]]; then
        case $SLURM_CONF in
        /etc/slurm/slurm.conf) name="" ;;
        /etc/slurm-*/slurm.conf)
            name=${SLURM_CONF#/etc/slurm-}
            name=${name%/slurm.conf}
            ;;
        *) die "SLURM_CONF=$SLURM_CONF is not a config this script writes (/etc/slurm/slurm.conf or /etc/slurm-NAME/slurm.conf)" ;;
        esac
    fi
    [[ -z $name || $name =~ ^[a-z][a-z0-9]{0,7}$ ]] ||
        die "instance name '$name' must be 1-8 lower-case letters and digits, starting with a letter"
    echo "$name"
}

# set_instance NAME: every path, port, address and name of that instance
set_instance() {
    INSTANCE=$1
    NET_PREFIX=${SLURM_CLUSTER_NET:-10.217}
    if [[ -z $INSTANCE ]]; then
        IDX=0
        CONF_DIR=/etc/slurm
        LOG_DIR=/var/log/slurm
        CTLD_SPOOL=/var/spool/slurmctld
        SLURMD_SPOOL=/var/spool/slurmd-%n
        CTLD_PID=/run/slurmctld.pid
        SLURMD_PID=/run/slurmd-%n.pid
        CTLD_PORT=6817
        CLUSTER_NAME=${SLURM_CLUSTER_NAME:-arvwrap}
        NODE_PREFIX=node
    else
        IDX=${SLURM_CLUSTER_INDEX:-$(($(cksum <<<"$INSTANCE" | cut -d' ' -f1) % 200 + 1))}
        CONF_DIR=/etc/slurm-$INSTANCE
        LOG_DIR=/var/log/slurm-$INSTANCE
        CTLD_SPOOL=/var/spool/slurm-$INSTANCE/slurmctld
        SLURMD_SPOOL=/var/spool/slurm-$INSTANCE/slurmd-%n
        CTLD_PID=/run/slurm-$INSTANCE/slurmctld.pid
        SLURMD_PID=/run/slurm-$INSTANCE/slurmd-%n.pid
        CTLD_PORT=$((7000 + 2 * IDX))
        CLUSTER_NAME=arvwrap-$INSTANCE
        NODE_PREFIX=$INSTANCE-node
    fi
    ((IDX >= 0 && IDX <= 254)) || die "SLURM_CLUSTER_INDEX=$IDX is not 0..254"
    SLURMD_PORT=$((CTLD_PORT + 1))
    CONF=$CONF_DIR/slurm.conf
    CTLD_LOG=$LOG_DIR/slurmctld.log
    SLURMD_LOG=$LOG_DIR/slurmd-%n.log
    JOBCOMP_LOG=$LOG_DIR/jobcomp.log
    SUBNET=$NET_PREFIX.$IDX
    HOST_ADDR=$SUBNET.1          # the controller, on the bridge
    BRIDGE=sw${IDX}br
    # the Slurm commands this script runs, and those of whoever `eval`s `env`, use it
    export SLURM_CONF=$CONF
}

# The one-node cluster of earlier versions of this script (slurmd on the host itself):
# `down` of the default instance stops it too, so a machine switches with down + up.
LEGACY_SLURMD_PID=/run/slurmd.pid

MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
WAIT_SECONDS=${SLURM_CLUSTER_WAIT:-60}
MAX_NODES=64

# node_name I, node_addr I, node_netns NAME, node_veth I, node_index NAME
node_name() { echo "$NODE_PREFIX$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_netns() { echo "slurm-$1"; }
node_veth() { echo "sw${IDX}n$1"; }
node_index() {
    local i=${1#"$NODE_PREFIX"}
    [[ $i != "$1" && $i =~ ^[0-9]+$ ]] && ((i >= 1 && i <= MAX_NODES)) ||
        die "no node '$1' in this cluster (its nodes are named ${NODE_PREFIX}1, ${NODE_PREFIX}2, ...)"
    echo "$i"
}
per_node() { echo "${1//%n/$2}"; }   # per_node PATTERN NODE: a %n path of one node

die() {
    echo "slurm-cluster: error: $*" >&2
    exit 1
}

say() { echo "slurm-cluster: $*" >&2; }

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

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root"
}

# ---------------------------------------------------------------- processes

# pidfile_pid PIDFILE NAME: the pid the file names if it is a live process NAME
pidfile_pid() {
    local pidfile=$1 name=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && return 1
    echo "$pid"
}

# daemon_pid PIDFILE NAME: the same, if that process is of this instance (its command
# line names our config; the default instance's daemons of earlier versions of this
# script were started without -f)
daemon_pid() {
    local pid cmdline
    pid=$(pidfile_pid "$1" "$2") || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    if [[ $cmdline == *" -f $CONF "* ]] || { [[ -z $INSTANCE ]] && [[ $cmdline != *" -f "* ]]; }; then
        echo "$pid"
        return 0
    fi
    return 1
}

# stop_pids SECONDS PID...: SIGTERM them all at once, wait up to SECONDS, then SIGKILL
# (slurmctld saves its state and takes ~1.5 s to exit, slurmd and munged ~1.5-2 s)
stop_pids() {
    local seconds=$1 p i alive
    shift
    (($#)) || return 0
    for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
    for ((i = 0; i < seconds * 20; i++)); do
        alive=""
        for p in "$@"; do
            if [[ -d /proc/$p ]] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; then alive=1; fi
        done
        [[ -z $alive ]] && return 0
        sleep 0.05
    done
    for p in "$@"; do
        if kill -0 "$p" 2>/dev/null; then
            say "$(cat "/proc/$p/comm" 2>/dev/null) ($p) did not stop on SIGTERM, killing it"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
}
