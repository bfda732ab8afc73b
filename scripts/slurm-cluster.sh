#!/usr/bin/env bash
# A Slurm test cluster on this one machine for arv-wrap's tests (Debian 12, Slurm 22.05,
# root, no systemd, no cgroups, no slurmdbd): one slurmctld on the host and N nodes,
# each a slurmd in a network namespace of its own with its own hostname, sharing this
# machine's filesystem (docs/slurm.md).
#
#   slurm-cluster.sh up [--nodes N]    install if needed, configure, start, wait until
#                                      every node is idle (N: as configured, else 1)
#   slurm-cluster.sh down              stop everything and remove the namespaces, veths
#                                      and bridge (config and state are kept)
#   slurm-cluster.sh status            daemons, sinfo, each node's state; exit 0 iff
#                                      the controller answers and every node is usable
#   slurm-cluster.sh nodes             the node names, one per line
#   slurm-cluster.sh env               `export SLURM_CONF=...` of this instance
#   slurm-cluster.sh stop-controller   stop only slurmctld (a controller that does not answer)
#   slurm-cluster.sh start-controller  start slurmctld again (and any slurmd not running)
#   slurm-cluster.sh kill-node NODE    SIGKILL its slurmd and every process in its namespace
#   slurm-cluster.sh kill-slurmd NODE  SIGKILL only its slurmd (its jobs run on)
#   slurm-cluster.sh node-down NODE [REASON]   scontrol update state=down (kills its jobs)
#   slurm-cluster.sh start-node NODE   start its slurmd, resume it, wait until usable
#   slurm-cluster.sh exec NODE -- CMD...       run CMD in the node's namespaces
#
# Instances: with SLURM_CLUSTER_INSTANCE=NAME (or SLURM_CONF=/etc/slurm-NAME/slurm.conf)
# every command acts on a second, independent cluster; `env` prints the SLURM_CONF that
# the Slurm commands, the tests and arv-wrap then use (scripts/slurm-cluster/instance.sh).
set -euo pipefail

LIB=$(dirname "${BASH_SOURCE[0]}")/slurm-cluster
# shellcheck source=slurm-cluster/instance.sh
source "$LIB/instance.sh"
# shellcheck source=slurm-cluster/setup.sh
source "$LIB/setup.sh"
# shellcheck source=slurm-cluster/config.sh
source "$LIB/config.sh"
# shellcheck source=slurm-cluster/nodes.sh
source "$LIB/nodes.sh"

all_nodes() {  # the configured node names
    local i n
    n=$(configured_nodes)
    for ((i = 1; i <= n; i++)); do node_name "$i"; done
}

start_slurmctld() {
    daemon_pid "$CTLD_PID" slurmctld >/dev/null && return 0
    rm -f "$CTLD_PID"
    # -i: do not refuse to start over a state file that does not fit the current config
    slurmctld -i -f "$CONF" || fail_with_log "$CTLD_LOG" "slurmctld did not start"
    local i
    for ((i = 0; i < WAIT_SECONDS * 20; i++)); do
        if timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then return 0; fi
        daemon_pid "$CTLD_PID" slurmctld >/dev/null || fail_with_log "$CTLD_LOG" "slurmctld exited during start-up"
        sleep 0.05
    done
    fail_with_log "$CTLD_LOG" "slurmctld does not answer 'scontrol ping' after ${WAIT_SECONDS}s"
}

slurmd_pids() {  # every slurmd of this instance (and the host slurmd of old)
    local node
    for node in $(all_nodes); do slurmd_pid "$node" || true; done
    [[ -n $INSTANCE ]] || daemon_pid "$LEGACY_SLURMD_PID" slurmd || true
}

# stop_slurm: the slurmds (what they keep on a node does not matter here: 2 s, then
# SIGKILL; one took 17 s to exit on SIGTERM), then slurmctld (up to 10 s: it saves
# the cluster's state)
stop_slurm() {
    # shellcheck disable=SC2046
    stop_pids 2 $(slurmd_pids)
    # shellcheck disable=SC2046
    stop_pids 10 $(daemon_pid "$CTLD_PID" slurmctld || true)
}

smoke_check() {  # one srun on every node, each answering with its own name
    local n=$1 out rc=0 want
    out=$(timeout 60 srun -N"$n" -n"$n" -t 1 hostname 2>/tmp/slurm-cluster-smoke.err) || rc=$?
    want=$(all_nodes | sort)
    if [[ $rc -ne 0 || $(sort <<<"$out") != "$want" ]]; then
        echo "slurm-cluster: error: smoke check 'srun -N$n hostname' gave (exit $rc): $out" \
            "$(cat /tmp/slurm-cluster-smoke.err)" >&2
        exit 1
    fi
}

cmd_up() {
    local n="" changed i
    while (($#)); do
        case $1 in
        --nodes) n=${2:-}; shift 2 || die "--nodes needs a number" ;;
        --nodes=*) n=${1#--nodes=}; shift ;;
        *) die "up: unknown argument '$1' (usage: up [--nodes N])" ;;
        esac
    done
    need_root up
    if [[ -z $n ]]; then
        n=$(configured_nodes)
        ((n > 0)) || n=1
    fi
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= MAX_NODES)) || die "--nodes must be 1..$MAX_NODES"
    install_packages
    munge_up
    changed=$(install_config "$n")
    if [[ $changed == changed ]]; then
        if [[ -n $(slurmd_pids) ]] || daemon_pid "$CTLD_PID" slurmctld >/dev/null; then
            say "slurm.conf changed, restarting the daemons"
        fi
        stop_slurm
        for ns in $(instance_netns); do   # nodes beyond the new count
            i=${ns#slurm-"$NODE_PREFIX"}
            ((i <= n)) || netns_down "$ns"
        done
    fi
    bridge_up
    start_slurmctld
    for ((i = 1; i <= n; i++)); do start_slurmd "$i"; done
    # shellcheck disable=SC2046
    wait_usable $(all_nodes)
    smoke_check "$n"
    local cpus mem
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' "$CONF" | head -n 1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' "$CONF" | head -n 1)
    echo "slurm cluster up: $n node(s) $(all_nodes | tr '\n' ' ')cpus=$cpus mem=${mem}MB each;" \
        "SLURM_CONF=$CONF"
}

cmd_down() {
    need_root down
    stop_slurm
    net_down
    rm -f "$CTLD_PID" "${SLURMD_PID//%n/*}"
    if [[ -z $INSTANCE ]] && ! other_instances_up; then
        # shellcheck disable=SC2046
        stop_pids 10 $(munge_pids)
    fi
    echo "slurm cluster down"
}

daemon_line() {  # daemon_line WHAT PIDS
    if [[ -n ${2// /} ]]; then echo "$1: running (pid ${2% })"; else echo "$1: not running"; fi
}

cmd_status() {
    local node state pid bad=0
    echo "instance: ${INSTANCE:-default} (SLURM_CONF=$CONF)"
    daemon_line munged "$(munge_pids | tr '\n' ' ')"
    daemon_line slurmctld "$(daemon_pid "$CTLD_PID" slurmctld || true)"
    command -v sinfo >/dev/null || { echo "slurm is not installed"; return 1; }
    [[ -r $CONF ]] || { echo "no $CONF: run 'up' first"; return 1; }
    for node in $(all_nodes); do
        pid=$(slurmd_pid "$node" || true)
        daemon_line "slurmd of $node" "$pid"
        [[ -n $pid ]] || bad=1
    done
    # a controller that does not run makes sinfo retry for ~9 s: ask it with a ping first
    if ! timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        echo "slurmctld does not answer: $(timeout 10 scontrol ping 2>&1 | head -n 1)"
        return 1
    fi
    timeout 20 sinfo 2>&1 || true
    [[ -n $(all_nodes) ]] || { echo "no node in $CONF (one of an earlier version: run 'up')"; return 1; }
    for node in $(all_nodes); do
        state=$(node_state "$node")
        if usable "$state"; then
            echo "node $node: $state"
        else
            echo "node $node: '$state' (not usable)"
            bad=1
        fi
    done
    return $bad
}

cmd_start_controller() {
    need_root start-controller
    [[ -f $CONF ]] || die "no $CONF: run 'up' first"
    munge_up
    bridge_up
    start_slurmctld
    local i n
    n=$(configured_nodes)
    for ((i = 1; i <= n; i++)); do start_slurmd "$i"; done
    # shellcheck disable=SC2046
    wait_usable $(all_nodes)
    echo "slurmctld started"
}

cmd_node_down() {
    local node=$1 reason=${2:-slurm-cluster.sh node-down} i state
    node_index "$node" >/dev/null
    # (an update that races the controller's own view of a node that stopped
    # answering may not stick: it is sent again until the node is down)
    for ((i = 0; i < 100; i++)); do
        if ((i % 20 == 0)); then
            scontrol update NodeName="$node" State=DOWN Reason="$reason" ||
                die "scontrol could not set $node down"
        fi
        state=$(timeout 10 scontrol -o show node "$node" 2>/dev/null | grep -o ' State=[^ ]*') || true
        [[ $state == " State=DOWN"* ]] && break
        sleep 0.05
    done
    [[ $state == " State=DOWN"* ]] || die "$node is not down after 5s (${state# })"
    echo "node $node: down"
}

cmd_start_node() {
    local node=$1 i
    need_root start-node
    i=$(node_index "$node")
    bridge_up
    start_slurmd "$i"
    wait_usable "$node"
    echo "node $node: $(node_state "$node")"
}

cmd_exec() {
    local node=$1 ns
    shift
    [[ ${1:-} == -- ]] && shift
    (($#)) || die "usage: exec NODE -- COMMAND [ARGS...]"
    node_index "$node" >/dev/null
    ns=$(node_netns "$node")
    [[ -e /run/netns/$ns ]] || die "node $node has no network namespace (is the cluster up?)"
    exec nsenter --net="/run/netns/$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}

set_instance "$(instance_from_env)"
cmd=${1:-}
(($#)) && shift
case $cmd in
up) cmd_up "$@" ;;
down) cmd_down ;;
status) cmd_status ;;
nodes) all_nodes ;;
env) echo "export SLURM_CONF=$CONF" ;;
stop-controller)
    need_root stop-controller
    # shellcheck disable=SC2046
    stop_pids 10 $(daemon_pid "$CTLD_PID" slurmctld || true)
    echo "slurmctld stopped"
    ;;
start-controller) cmd_start_controller ;;
kill-node)
    need_root kill-node
    node_index "${1:?usage: kill-node NODE}" >/dev/null
    echo "node $1: killed $(kill_node "$1") processes"
    ;;
kill-slurmd)
    need_root kill-slurmd
    node_index "${1:?usage: kill-slurmd NODE}" >/dev/null
    pid=$(slurmd_pid "$1") || die "slurmd of $1 is not running"
    kill -KILL "$pid"
    echo "slurmd of $1 ($pid) killed"
    ;;
node-down) cmd_node_down "${1:?usage: node-down NODE [REASON]}" "${2:-}" ;;
start-node) cmd_start_node "${1:?usage: start-node NODE}" ;;
exec) cmd_exec "${1:?usage: exec NODE -- COMMAND...}" "${@:2}" ;;
*)
    echo "usage: $0 up [--nodes N]|down|status|nodes|env|stop-controller|start-controller|" \
        "kill-node NODE|kill-slurmd NODE|node-down NODE [REASON]|start-node NODE|exec NODE -- CMD..." >&2
    exit 2
    ;;
esac
