#!/usr/bin/env bash
# The align example's last step, shared by its five drivers: what was aligned and
# called, and how many of the planted SNPs were found, into OUTDIR/summary.txt.
#
#   summarize.sh OUTDIR
#
# `samtools idxstats` reads only the BAM index (a quick call: local under
# whitelists/bcbio.yaml); `bcftools query` reads the whole VCF (a job).
set -euo pipefail
out=$1
tab=$(printf '\t')

samtools idxstats "$out/sample.bam" > "$out/idxstats.tsv"
bcftools query -f '%CHROM\t%POS\t%REF\t%ALT\t[%GT]\t%QUAL\n' "$out/calls.vcf.gz" > "$out/calls.tsv"

{
    awk -F "$tab" '$1 != "*" { printf "align: %s %d bp, %d reads mapped\n", $1, $2, $3 }
                   $1 == "*" { printf "align: %d reads unmapped\n", $4 }' "$out/idxstats.tsv"
    awk -F "$tab" 'NR == FNR { planted[$1 FS $2 FS $3 FS $4] = $5; next }
        { n++; if ($6 >= 20) good++; key = $1 FS $2 FS $3 FS $4
          if (key in planted) { found++; if (planted[key] == $5) same_gt++ } }
        END { printf "align: %d variants called, %d with QUAL >= 20; %d of %d planted SNPs found, %d with the planted genotype\n",
                     n, good, found, length(planted), same_gt }' "$out/data/truth.tsv" "$out/calls.tsv"
} > "$out/summary.txt"
cat "$out/summary.txt"
