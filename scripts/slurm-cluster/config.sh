# Sourced by scripts/slurm-cluster.sh: the instance's slurm.conf.

# configured_nodes: how many nodes the instance's current slurm.conf has (0: none, or a
# config of an earlier version of this script, whose one node was the host itself)
configured_nodes() {
    [[ -r $CONF ]] || { echo 0; return; }
    grep -c "^NodeName=$NODE_PREFIX[0-9]* NodeAddr=$SUBNET\." "$CONF" || true
}

# node_hardware: "CPUS MEMORY_MB TOPOLOGY" as slurmd sees this machine (each node is
# given all of it: they share the machine, as jobs on one node share its cores)
node_hardware() {
    local hw cpus mem realmem topo=""
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
    echo "$cpus $realmem $topo"
}

# write_config FILE N: the slurm.conf of an N-node cluster
write_config() {
    local out=$1 n=$2 cpus mem topo i names
    read -r cpus mem topo <<<"$(node_hardware)"
    names="$(node_name 1)"
    ((n == 1)) || names="$NODE_PREFIX[1-$n]"
    {
        cat <<EOF
# Written by arv-wrap scripts/slurm-cluster.sh: a $n-node test cluster on this machine,
# each node a slurmd in a network namespace of its own (scripts/slurm-cluster/nodes.sh).
# Edits are overwritten by the next 'slurm-cluster.sh up'.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$(hostname -s)($HOST_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT

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
# a node that stopped answering comes back when its slurmd registers again; one an
# admin set down (node-down) stays down until resumed (2 would undo that within ms)
ReturnToService=1
# a batch job whose node failed ends (NODE_FAIL) instead of being queued again
JobRequeue=0

StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info

EOF
        for ((i = 1; i <= n; i++)); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") NodeHostname=$(node_name "$i") CPUs=$cpus ${topo:+$topo }RealMemory=$mem State=UNKNOWN"
        done
        cat <<EOF
# debug: every node; short: every node, 5 minutes at most; solo: one node only (for
# what must be "the only node of the partition")
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$names Default=NO MaxTime=00:05:00 State=UP
PartitionName=solo Nodes=$(node_name 1) Default=NO MaxTime=INFINITE State=UP
EOF
    } >"$out"
}

# install_config N: write slurm.conf if it changed; prints "changed" or "same"
install_config() {
    local tmp
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$(dirname "$CTLD_PID")"
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    write_config "$tmp" "$1"
    chmod 0644 "$tmp"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        echo same
    else
        mv -f "$tmp" "$CONF"
        echo changed
    fi
}
