#!/usr/bin/env bash
# Time examples/align/run.sh unwrapped and under arv-wrap, and count the jobs.
#
#   examples/align/measure.sh [BACKEND...]      (default: local; e.g. local slurm)
#
# Each mode runs ALIGN_RUNS times (default 5) into a fresh output dir; prints the
# median and the range of the wall-clock seconds. "cold" starts each run with a
# fresh state dir (so a dispatcher starts); "warm" reuses one whose dispatcher is
# running. arv-wrap is `arv-wrap` if installed, else `python3 -m arvwrap`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
runs=${ALIGN_RUNS:-5}
backends=("${@:-local}")
if command -v arv-wrap >/dev/null; then arv=(arv-wrap); else arv=(python3 -m arvwrap); fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset "${!ARV_WRAP_@}"
export ARV_WRAP_IDLE_TIMEOUT=10   # the cold runs' dispatchers leave soon after

stats() {  # stats LABEL SECONDS...: median and range
    local label=$1; shift
    printf '%s\n' "$@" | sort -n | awk -v label="$label" '
        { t[NR] = $1 } END { m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
                             printf "%-28s median %.2f s  (%.2f-%.2f s, %d runs)\n", label, m, t[1], t[NR], NR }'
}

timed() {  # timed CMD...: wall-clock seconds of one run, output discarded
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > /dev/null 2>&1
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

times=()
for i in $(seq "$runs"); do times+=("$(timed "$here/run.sh" "$work/plain$i")"); done
stats "unwrapped" "${times[@]}"

for backend in "${backends[@]}"; do
    times=()
    for i in $(seq "$runs"); do
        times+=("$(ARV_WRAP_STATE_DIR=$work/state-$backend-cold$i timed \
            "${arv[@]}" -w "$root/whitelists/bcbio.yaml" -b "$backend" -- "$here/run.sh" "$work/$backend-cold$i")")
    done
    stats "wrapped $backend, cold" "${times[@]}"
    export ARV_WRAP_STATE_DIR=$work/state-$backend-warm
    "${arv[@]}" -w "$root/whitelists/bcbio.yaml" -b "$backend" -- "$here/run.sh" "$work/$backend-first" >/dev/null 2>&1
    times=()
    for i in $(seq "$runs"); do
        times+=("$(timed "${arv[@]}" -w "$root/whitelists/bcbio.yaml" -b "$backend" -- "$here/run.sh" "$work/$backend-warm$i")")
    done
    stats "wrapped $backend, warm" "${times[@]}"
    jobs=$("${arv[@]}" jobs --json | python3 -c '
import json, sys
records = json.load(sys.stdin)
runs = [r for r in records if r["kind"] == "run"]
last = [r for r in records if r["kind"] == "job" and r["run"] == runs[0]["id"]]
print(len(last), "jobs per run:", ", ".join(sorted(" ".join(r["argv"][:2]) for r in last)))')
    echo "wrapped $backend: $jobs"
    unset ARV_WRAP_STATE_DIR
done
