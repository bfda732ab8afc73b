# Sourced by scripts/slurm-cluster.sh: the packages (installed with apt when missing)
# and munged, which every instance shares.

PACKAGES=(slurmctld slurmd slurm-client munge iproute2 util-linux)

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    need_root install
    say "installing ${missing[*]}"
    # another apt/dpkg may hold the lock right now: wait for it (up to 15 min) rather than fail
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=900 -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold --no-install-recommends)
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >/tmp/slurm-cluster-apt.log 2>&1; then
        say "install failed, running apt-get update first"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >>/tmp/slurm-cluster-apt.log 2>&1 ||
            fail_with_log /tmp/slurm-cluster-apt.log "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >>/tmp/slurm-cluster-apt.log 2>&1 ||
            fail_with_log /tmp/slurm-cluster-apt.log "apt-get install ${missing[*]} failed"
    fi
}

munge_pids() {  # the running munged (from its pid file, else by exact name)
    local pid
    if pid=$(pidfile_pid "$MUNGE_PID" munged); then
        echo "$pid"
    else
        pgrep -x munged || true
    fi
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

munge_up() {
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    # munged refuses a key readable by others, or a key dir writable by others
    chown munge:munge "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 0755 "$MUNGE_RUN"

    if [[ -n $(munge_pids) ]] && munge_works; then
        return 0
    fi
    # shellcheck disable=SC2046
    stop_pids 10 $(munge_pids)
    rm -f "$MUNGE_RUN"/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged || fail_with_log "$MUNGE_LOG" "munged did not start"
    local i
    for ((i = 0; i < 50; i++)); do
        if munge_works; then return 0; fi
        sleep 0.1
    done
    fail_with_log "$MUNGE_LOG" "munged started but munge -n | unmunge does not work"
}

# other_instances_up: true if a slurmctld of another instance of this script runs
# (munged is theirs too)
other_instances_up() {
    local f pid
    for f in /run/slurmctld.pid /run/slurm-*/slurmctld.pid; do
        [[ -r $f && $f != "$CTLD_PID" ]] || continue
        pid=$(tr -dc '0-9' <"$f")
        [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == slurmctld ]] && return 0
    done
    return 1
}
