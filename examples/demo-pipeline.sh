#!/usr/bin/env bash
# A small deterministic pipeline built from coreutils, to try arv-wrap on any machine:
#
#   arv-wrap -w whitelists/demo.yaml -- examples/demo-pipeline.sh [OUTDIR]
#
# With whitelists/demo.yaml, sort, uniq, gzip, md5sum and sha256sum run as jobs
# (`sort | gzip` is a pipe between two jobs); seq-like generation (awk), tr, head,
# wc and the --version checks stay local. Without arv-wrap it runs the same and
# prints the same summary. OUTDIR defaults to ./demo-out; DEMO_LINES (200000,
# about 4 MB of input) and DEMO_PARALLEL (2, sort's --parallel) tune the size.
set -euo pipefail
export LC_ALL=C          # byte order for sort: the same outputs on every machine

out=${1:-./demo-out}
lines=${DEMO_LINES:-200000}
parallel=${DEMO_PARALLEL:-2}
mkdir -p "$out"

# Quick calls of whitelisted tools: `when: not_flags` keeps these local.
for tool in sort uniq gzip md5sum sha256sum; do
    "$tool" --version >/dev/null
done

# 1. Input: pseudo-random four-word lines. A Park-Miller generator in awk (exact in
#    double precision, so every awk gives the same bytes); word k is drawn with
#    probability falling with k, so some words are much commoner than others.
awk -v n="$lines" 'BEGIN {
    split("ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu " \
          "ma me mi mo mu na ne ni no nu ra re ri ro ru sa se si so su " \
          "ta te ti to tu", syl, " ")
    x = 20240601
    for (i = 1; i <= n; i++) {
        line = ""
        for (w = 0; w < 4; w++) {
            x = (x * 16807) % 2147483647
            r = x / 2147483647
            k = int(2500 * r * r * r)
            line = line (w ? " " : "") syl[k % 50 + 1] syl[int(k / 50) + 1]
        }
        print line
    }
}' > "$out/input.txt"

# 2. Sort the lines and compress them: two jobs joined by a pipe.
sort --parallel="$parallel" -S 64M "$out/input.txt" | gzip -n > "$out/sorted.txt.gz"

# 3. Word counts, commonest first: gzip -dc and sort, uniq -c are jobs; tr and awk are local.
tab=$(printf '\t')
gzip -dc "$out/sorted.txt.gz" \
    | tr ' ' '\n' \
    | sort --parallel="$parallel" -S 64M \
    | uniq -c \
    | awk '{ print $2 "\t" $1 }' \
    | sort -t "$tab" -k2,2nr -k1,1 > "$out/counts.tsv"

# 4. Checksums of everything, then a check of them (each a job).
(
    cd "$out"
    md5sum input.txt sorted.txt.gz counts.tsv > MD5SUMS
    sha256sum input.txt sorted.txt.gz counts.tsv > SHA256SUMS
    md5sum --check --quiet MD5SUMS
)

# 5. Consistency and summary.
n_input=$(wc -l < "$out/input.txt")
n_sorted=$(gzip -dc "$out/sorted.txt.gz" | wc -l)
if [ "$n_input" -ne "$n_sorted" ]; then
    echo "demo: sorted.txt.gz has $n_sorted lines, input.txt has $n_input" >&2
    exit 1
fi
n_words=$(wc -l < "$out/counts.tsv")
top=$(head -n 3 "$out/counts.tsv" | tr '\t' '=' | paste -sd ' ' -)
sha=$(awk '$2 == "sorted.txt.gz" { print substr($1, 1, 16) }' "$out/SHA256SUMS")

echo "demo: $n_input lines, $(wc -c < "$out/input.txt") bytes of input in $out"
echo "demo: sorted.txt.gz $(wc -c < "$out/sorted.txt.gz") bytes, sha256 $sha..."
echo "demo: $n_words distinct words; commonest: $top"
echo "demo: ok"
