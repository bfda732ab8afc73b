#!/usr/bin/env bash
# A local Docker engine for the docker backend's tests (as root, Debian): installs
# docker.io and busybox-static when missing, starts dockerd in the background when
# it does not answer (no iptables, no bridge: this machine has no network for it),
# waits until it answers, and builds the test images by `docker import` of a
# directory tree (no registry is reachable). Idempotent; run from anywhere.
set -euo pipefail

SOCK=/var/run/docker.sock
LOG=/var/log/arv-wrap-dockerd.log
BUSYBOX_IMAGE=arvwrap-test-busybox:1
# The applets the tests' tools use, each a symlink to /bin/busybox.
APPLETS=(sh cat echo sleep id touch wc kill ls head dd true false printf env stat
         rm mkdir pwd test yes tr)

# This engine, whatever DOCKER_HOST says (any docker client on PATH talks to it).
DOCKER=(docker -H "unix://$SOCK")

answers() { "${DOCKER[@]}" version >/dev/null 2>&1; }

install_missing() {
    local missing=()
    dpkg -s docker.io >/dev/null 2>&1 || missing+=(docker.io)
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    if ((${#missing[@]})); then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    python3 -c 'import docker' 2>/dev/null ||
        python3 -m pip install -q --disable-pip-version-check docker
}

start_engine() {
    answers && return 0
    # No iptables (not allowed here) and no default bridge: containers get only lo.
    setsid /usr/sbin/dockerd --iptables=false --ip6tables=false --bridge=none \
        -H "unix://$SOCK" >>"$LOG" 2>&1 </dev/null &
    for _ in $(seq 1 300); do
        answers && return 0
        sleep 0.1
    done
    echo "docker-engine: dockerd did not answer within 30 s; see $LOG" >&2
    tail -n 20 "$LOG" >&2 || true
    return 1
}

build_busybox() {
    "${DOCKER[@]}" image inspect "$BUSYBOX_IMAGE" >/dev/null 2>&1 && return 0
    local tree
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' RETURN
    mkdir -p "$tree/bin" "$tree/tmp" "$tree/etc"
    chmod 1777 "$tree/tmp"
    cp /bin/busybox "$tree/bin/busybox"
    for applet in "${APPLETS[@]}"; do
        ln -s busybox "$tree/bin/$applet"
    done
    # no PATH in the image's config: the engine's default PATH finds /bin
    tar -C "$tree" -c . | "${DOCKER[@]}" import - "$BUSYBOX_IMAGE" >/dev/null
}

install_missing
start_engine
build_busybox
echo "docker-engine: $("${DOCKER[@]}" version --format 'engine {{.Server.Version}}') up; image $BUSYBOX_IMAGE"
