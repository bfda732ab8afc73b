#!/usr/bin/env python3
"""Write the align example's inputs: a small reference, paired reads from a sample
that carries a few planted SNPs, and the list of those SNPs.

    gen.py DATADIR [PAIRS]

writes DATADIR/ref.fa (two contigs, 30 kb and 20 kb), DATADIR/reads_1.fq and
DATADIR/reads_2.fq (PAIRS read pairs of 2 x 100 bp, default 4000: about 16x),
DATADIR/truth.tsv (chrom, 1-based pos, ref, alt, genotype of each planted SNP).

Deterministic: the same bytes on every machine and Python >= 3.6 (only
random.Random(seed).random() is used, whose sequence Python keeps stable), no
network, no third-party module. About 0.3 s.
"""
import os
import random
import sys

SEED = 20240601
CONTIGS = (("chrA", 30000), ("chrB", 20000))
SNPS_PER_CONTIG = 6           # every third one heterozygous
READ_LEN = 100
FRAGMENT_MEAN, FRAGMENT_SD = 300, 30
ERROR_RATE = 0.002            # substitutions per base, uniform
BASES = "ACGT"
COMPLEMENT = str.maketrans("ACGT", "TGCA")


def pick(rng, n):
    """An integer in [0, n) from rng.random() alone."""
    return min(int(rng.random() * n), n - 1)


def gauss(rng):
    """A standard normal deviate from rng.random() alone (Irwin-Hall, 12 uniforms)."""
    return sum(rng.random() for _ in range(12)) - 6.0


def wrap(seq, width=60):
    return "\n".join(seq[i:i + width] for i in range(0, len(seq), width))


def main(argv):
    if len(argv) not in (2, 3):
        sys.stderr.write("usage: gen.py DATADIR [PAIRS]\n")
        return 2
    out = argv[1]
    pairs = int(argv[2]) if len(argv) == 3 else 4000
    rng = random.Random(SEED)
    os.makedirs(out, exist_ok=True)

    # 1. The reference, and the sample's two haplotypes with the planted SNPs.
    reference, haplotypes, truth = {}, {}, []
    for name, length in CONTIGS:
        seq = "".join(BASES[pick(rng, 4)] for _ in range(length))
        reference[name] = seq
        hap = [list(seq), list(seq)]
        step = length // (SNPS_PER_CONTIG + 1)
        for k in range(SNPS_PER_CONTIG):
            pos = step * (k + 1) + pick(rng, 200) - 100          # 0-based, away from the ends
            ref = seq[pos]
            alt = "ACGT".replace(ref, "")[pick(rng, 3)]
            het = k % 3 == 2
            hap[0][pos] = alt
            if not het:
                hap[1][pos] = alt
            truth.append((name, pos + 1, ref, alt, "0/1" if het else "1/1"))
        haplotypes[name] = ["".join(h) for h in hap]

    with open(os.path.join(out, "ref.fa"), "w") as f:
        for name, _ in CONTIGS:
            f.write(f">{name}\n{wrap(reference[name])}\n")
    with open(os.path.join(out, "truth.tsv"), "w") as f:
        for row in truth:
            f.write("\t".join(map(str, row)) + "\n")

    # 2. Read pairs: a fragment from a random contig (by length) and haplotype,
    #    read 1 forward from its start, read 2 reverse-complemented from its end;
    #    half the fragments come from the other strand (reads swapped).
    total = sum(length for _, length in CONTIGS)
    quality = "I" * READ_LEN

    def mutate(read):
        bases = list(read)
        for i in range(len(bases)):
            if rng.random() < ERROR_RATE:
                bases[i] = "ACGT".replace(bases[i], "")[pick(rng, 3)]
        return "".join(bases)

    with open(os.path.join(out, "reads_1.fq"), "w") as r1, \
            open(os.path.join(out, "reads_2.fq"), "w") as r2:
        for i in range(pairs):
            x = pick(rng, total)
            for name, length in CONTIGS:
                if x < length:
                    break
                x -= length
            hap = haplotypes[name][pick(rng, 2)]
            size = max(2 * READ_LEN, int(FRAGMENT_MEAN + FRAGMENT_SD * gauss(rng)))
            start = pick(rng, length - size + 1)
            fragment = hap[start:start + size]
            a = fragment[:READ_LEN]
            b = fragment[-READ_LEN:].translate(COMPLEMENT)[::-1]
            if rng.random() < 0.5:
                a, b = b, a
            read = f"pair{i + 1:05d}"
            r1.write(f"@{read}\n{mutate(a)}\n+\n{quality}\n")
            r2.write(f"@{read}\n{mutate(b)}\n+\n{quality}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
