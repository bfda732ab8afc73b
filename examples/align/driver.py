#!/usr/bin/env python3
"""The align example as a Python driver that runs its tools the way bcbio-nextgen
does: bash pipelines as strings through `subprocess.check_call(cmd, shell=True)`
with `set -o pipefail` in front (bcbio's do.run), single tools as argument lists
through `subprocess.run([...])`, and tool versions read from their output.

    driver.py OUTDIR [READS_1 READS_2]
    arv-wrap -w whitelists/bcbio.yaml -- examples/align/driver.py OUTDIR

The same steps as run.sh. A failing step stops the driver with that step's exit
status and one line naming the step, as bcbio's do.run reports it.
"""
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class StepFailed(Exception):
    def __init__(self, step, status):
        super().__init__(step)
        self.step, self.status = step, status


def run(cmd, step):
    """A shell pipeline, as bcbio's do.run runs it."""
    try:
        subprocess.check_call("set -o pipefail; " + cmd, shell=True, executable="/bin/bash")
    except subprocess.CalledProcessError as e:
        raise StepFailed(step, e.returncode) from None


def run_list(args, step, **kwargs):
    """One program, no shell."""
    result = subprocess.run(args, **kwargs)
    if result.returncode != 0:
        raise StepFailed(step, result.returncode)
    return result


def pipeline(out, r1, r2):
    q = shlex.quote
    data = os.path.join(out, "data")
    ref = os.path.join(data, "ref.fa")
    bam = os.path.join(out, "sample.bam")
    vcf = os.path.join(out, "calls.vcf.gz")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    run_list([sys.executable, os.path.join(HERE, "gen.py"), data], "generate")
    r1 = r1 or os.path.join(data, "reads_1.fq")
    r2 = r2 or os.path.join(data, "reads_2.fq")

    # Versions of the programs, as bcbio's programs.py collects them (quick calls).
    with open(os.path.join(out, "versions.txt"), "wb") as f:
        for tool in ("samtools", "bcftools"):
            f.write(run_list([tool, "--version"], "versions", stdout=subprocess.PIPE).stdout)

    with open(os.path.join(out, "logs", "bwa-index.log"), "wb") as log:
        run_list(["bwa", "index", ref], "bwa index", stderr=log)
    run_list(["samtools", "faidx", ref], "samtools faidx")

    run(f"bwa mem -t 2 -R '@RG\\tID:sample\\tSM:sample' {q(ref)} {q(r1)} {q(r2)}"
        f" | samtools sort -@ 2 -o {q(bam)} -", "align")
    run_list(["samtools", "index", bam], "samtools index")
    run_list(["samtools", "quickcheck", bam], "samtools quickcheck")

    run(f"bcftools mpileup -Ou -f {q(ref)} {q(bam)} | bcftools call -mv -Oz -o {q(vcf)}",
        "call")
    run_list(["bcftools", "index", "-t", vcf], "bcftools index")

    run_list([os.path.join(HERE, "summarize.sh"), out], "summary")


def main(argv):
    if len(argv) not in (2, 4):
        sys.stderr.write("usage: driver.py OUTDIR [READS_1 READS_2]\n")
        return 2
    out = argv[1]
    r1, r2 = (argv[2], argv[3]) if len(argv) == 4 else (None, None)
    try:
        pipeline(out, r1, r2)
    except StepFailed as e:
        status = e.status if e.status > 0 else 128 - e.status
        sys.stderr.write(f"driver.py: step '{e.step}' failed with exit status {status}\n")
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
