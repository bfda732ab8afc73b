#!/usr/bin/env bash
# The align example as a bash script with pipes.
#
#   run.sh OUTDIR [READS_1 READS_2]
#   arv-wrap -w whitelists/bcbio.yaml -- examples/align/run.sh OUTDIR
#
# Generates a 50 kb reference and 4000 read pairs with 12 planted SNPs into
# OUTDIR/data, then: bwa index, samtools faidx, bwa mem | samtools sort, samtools
# index, bcftools mpileup | bcftools call, bcftools index, and a summary. Given
# READS_1 and READS_2, aligns those instead of the generated reads.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

out=${1:?usage: run.sh OUTDIR [READS_1 READS_2]}
mkdir -p "$out/logs"
python3 "$here/gen.py" "$out/data"
ref=$out/data/ref.fa
r1=${2:-$out/data/reads_1.fq}
r2=${3:-$out/data/reads_2.fq}

# Quick calls: the versions used (local under arv-wrap).
{ samtools --version; bcftools --version; } > "$out/versions.txt"

# Index the reference: bwa's index (a job), the .fai (quick, local).
bwa index "$ref" 2> "$out/logs/bwa-index.log"
samtools faidx "$ref"

# Align and sort: two jobs joined by a pipe.
bwa mem -t 2 -R '@RG\tID:sample\tSM:sample' "$ref" "$r1" "$r2" \
    | samtools sort -@ 2 -o "$out/sample.bam" -
samtools index "$out/sample.bam"
samtools quickcheck "$out/sample.bam"

# Call variants: pileup as uncompressed BCF into the caller.
bcftools mpileup -Ou -f "$ref" "$out/sample.bam" \
    | bcftools call -mv -Oz -o "$out/calls.vcf.gz"
bcftools index -t "$out/calls.vcf.gz"

"$here/summarize.sh" "$out"
