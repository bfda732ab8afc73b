# Sourced by scripts/slurm-cluster.sh: the nodes. Each is a slurmd in a network
# namespace of its own (/run/netns/slurm-NODE), entered with nsenter, plus a UTS
# namespace (unshare --uts) whose hostname is the node's name; the mount and pid
# namespaces are the machine's, so every node sees this machine's filesystem and
# processes. `ip netns exec` is not used: it remounts /sys, which hides
# /sys/fs/cgroup, and slurmd 22.05 then refuses to start.
#
# Network: a host bridge with the controller's address ($SUBNET.1/24) and one veth per
# node ($SUBNET.(10+i)/24 inside the namespace as eth0). The namespaces get no default
# route: a node reaches the bridge's subnet and nothing else (the host forwards
# packets, so a default route would let the nodes out).

# ---------------------------------------------------------------- network

# (links are looked up with ip, not in /sys: /sys shows the network namespace of
# whoever mounted it, which need not be ours)
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

bridge_up() {
    if ! link_exists "$BRIDGE"; then
        ip link add "$BRIDGE" type bridge || die "cannot create the bridge $BRIDGE"
    fi
    ip addr replace "$HOST_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

node_net_up() {  # node_net_up I: the node's namespace and veth, addressed and up
    local node ns veth
    node=$(node_name "$1")
    ns=$(node_netns "$node")
    veth=$(node_veth "$1")
    [[ -e /run/netns/$ns ]] || ip netns add "$ns" || die "cannot create the network namespace $ns"
    if ! link_exists "$veth"; then
        ip link add "$veth" type veth peer name eth0 netns "$ns" ||
            die "cannot create the veth pair $veth / $ns:eth0"
    fi
    ip link set "$veth" master "$BRIDGE" up
    in_netns "$ns" ip addr replace "$(node_addr "$1")/24" dev eth0
    in_netns "$ns" ip link set eth0 up
    in_netns "$ns" ip link set lo up
}

in_netns() {  # in_netns NS CMD...: run CMD in that network namespace (mounts untouched)
    local ns=$1
    shift
    nsenter --net="/run/netns/$ns" "$@"
}

instance_netns() {  # the network namespaces of this instance's nodes, made by up
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^slurm-$NODE_PREFIX[0-9]+$" || true
}

netns_pids() {  # the processes in a network namespace
    ip netns pids "$1" 2>/dev/null | grep -E '^[0-9]+$' || true
}

netns_down() {  # netns_down NS: every process in it killed, the namespace removed
    local pids
    pids=$(netns_pids "$1")
    # shellcheck disable=SC2086
    [[ -z $pids ]] || stop_pids 5 $pids
    ip netns del "$1" 2>/dev/null || true
}

net_down() {  # every namespace, veth and the bridge of this instance
    local ns link
    for ns in $(instance_netns); do netns_down "$ns"; done
    # the veths go with their namespace; delete what is left explicitly so a fast
    # re-up never finds a half-removed pair
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^sw${IDX}n[0-9]+$"); do
        ip link del "$link" 2>/dev/null || true
    done
    ! link_exists "$BRIDGE" || ip link del "$BRIDGE" 2>/dev/null || true
}

# ---------------------------------------------------------------- slurmd

slurmd_pid() { daemon_pid "$(per_node "$SLURMD_PID" "$1")" slurmd; }

start_slurmd() {  # start_slurmd I
    local node
    node=$(node_name "$1")
    slurmd_pid "$node" >/dev/null && return 0
    node_net_up "$1"
    mkdir -p "$(per_node "$SLURMD_SPOOL" "$node")" "$(dirname "$(per_node "$SLURMD_PID" "$node")")"
    rm -f "$(per_node "$SLURMD_PID" "$node")"
    # slurmd daemonizes: the daemon keeps both namespaces; -N names the node
    in_netns "$(node_netns "$node")" unshare --uts sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' \
        sh "$node" "$CONF" || fail_with_log "$(per_node "$SLURMD_LOG" "$node")" "slurmd of $node did not start"
}

kill_node() {  # kill_node NODE: SIGKILL to every process in its namespace; prints how many
    local ns pids i
    ns=$(node_netns "$1")
    [[ -e /run/netns/$ns ]] || die "node $1 has no network namespace (is the cluster up?)"
    pids=$(netns_pids "$ns")
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -z $(netns_pids "$ns") ]] && break
        sleep 0.02
    done
    wc -w <<<"$pids"
}

# ---------------------------------------------------------------- node states

node_state() {  # the node's state as sinfo shows it (idle, mixed, down*, ...), or empty
    timeout 10 sinfo -h -n "$1" -o %T 2>/dev/null | head -n 1 || true
}

usable() { [[ $1 =~ ^(idle|mixed|allocated|completing)$ ]]; }

# wait_usable NODE...: wait until each node is idle/mixed/allocated; a node that answers
# but is down or drained (an admin's node-down, or an earlier failure) is resumed
wait_usable() {
    local start=$SECONDS node state waiting resumed=" "
    while ((SECONDS - start < WAIT_SECONDS)); do
        waiting=""
        for node in "$@"; do
            state=$(node_state "$node")
            usable "$state" && continue
            waiting+=" $node"
            # a trailing * is "not responding": its slurmd has not registered yet
            if [[ $state =~ ^(down|drain|drained|draining|fail|failing)$ && $resumed != *" $node "* ]]; then
                say "node $node is '$state', resuming it"
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                resumed+="$node "
            fi
            slurmd_pid "$node" >/dev/null ||
                fail_with_log "$(per_node "$SLURMD_LOG" "$node")" "slurmd of $node is not running (state '$state')"
        done
        [[ -z $waiting ]] && return 0
        daemon_pid "$CTLD_PID" slurmctld >/dev/null || fail_with_log "$CTLD_LOG" "slurmctld is not running"
        sleep 0.05
    done
    echo "slurm-cluster: error: not usable after ${WAIT_SECONDS}s:$waiting" >&2
    for node in $waiting; do
        timeout 5 scontrol show node "$node" >&2 || true
        log_tail "$(per_node "$SLURMD_LOG" "$node")"
    done
    log_tail "$CTLD_LOG"
    exit 1
}
