"""examples/align: a real variant-calling pipeline (bwa, samtools, bcftools), written
five ways (bash, make -j4, Snakemake, a bcbio-style Python driver, a Nextflow-style
Java driver), each run unmodified under arv-wrap and compared with its own run
without arv-wrap: the same alignments, the same calls, the heavy steps as jobs,
the quick calls local, and a failing step failing the pipeline the same way.

The unwrapped runs happen once per session (fixture `unwrapped`); each test runs one
driver wrapped, on one backend. Runs happen in a directory of their own with the
output dir `out` given relative, so the outputs and messages name the same paths.
"""
import gzip
import os
import re
import subprocess

import pytest

from arvwrap import backends
from conftest import ON_CI, arv_wrap, jobs, need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIGN = os.path.join(ROOT, "examples", "align")
BCBIO = os.path.join(ROOT, "whitelists", "bcbio.yaml")
MAKE = os.path.join(ROOT, "whitelists", "make.yaml")
MISSING = ("missing/reads_1.fq", "missing/reads_2.fq")   # the failing runs' reads

DRIVERS = ("bash", "make", "snakemake", "python", "java")
WHITELIST = {"bash": BCBIO, "make": MAKE, "snakemake": MAKE, "python": BCBIO, "java": BCBIO}
NEEDS = {"bash": ["bash"], "make": ["make"], "snakemake": ["snakemake"],
         "python": ["python3"], "java": ["java", "javac"]}

# The heavy steps, each one call of the pipeline: (argv[0], argv[1]) of every job.
HEAVY = sorted([("bwa", "index"), ("bwa", "mem"), ("samtools", "sort"),
                ("samtools", "index"), ("bcftools", "mpileup"), ("bcftools", "call"),
                ("bcftools", "query")])
# The quick calls the pipeline makes of the same tools: they must stay local.
QUICK = {("samtools", "--version"), ("samtools", "faidx"), ("samtools", "quickcheck"),
         ("samtools", "idxstats"), ("bcftools", "--version"), ("bcftools", "index")}


def command(driver, classes, reads=()):
    """The driver's command line, output dir `out` (relative), optional reads."""
    if driver == "bash":
        return [os.path.join(ALIGN, "run.sh"), "out", *reads]
    if driver == "make":
        return ["make", "-j4", "-f", os.path.join(ALIGN, "Makefile"), "OUT=out",
                *(f"R{i}={r}" for i, r in enumerate(reads, 1))]
    if driver == "snakemake":
        config = ["--config", *(f"r{i}={r}" for i, r in enumerate(reads, 1))] if reads else []
        return ["snakemake", "-s", os.path.join(ALIGN, "Snakefile"), "--cores", "2",
                "--quiet", "--directory", "out", *config]
    if driver == "python":
        return [os.path.join(ALIGN, "driver.py"), "out", *reads]
    if driver == "java":
        return ["java", f"-Dalign.home={ALIGN}", "-cp", classes, "Driver", "out", *reads]
    raise ValueError(driver)


def run(argv, cwd, env, wrap=None):
    """Run argv in cwd, directly or under `arv-wrap -w W -b B --`; the CompletedProcess."""
    os.makedirs(cwd, exist_ok=True)
    if wrap is None:
        return subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=300)
    whitelist_file, backend = wrap
    return arv_wrap("-w", whitelist_file, "-b", backend, "--", *argv, cwd=cwd, env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)


# Lines that differ from run to run whoever runs the pipeline: Snakemake's banner
# (date, workflow id), its log file name and elapsed time, bracketed dates.
# Dates, and make's note that other recipes were still running when one failed
# (which depends on how fast the parallel steps happened to be, wrapped or not).
VOLATILE = re.compile(r"\s*(Date|Workflow ID|Elapsed time|Complete log\(s\)):"
                      r"|\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]$"
                      r"|make: \*\*\* Waiting for unfinished jobs\.\.\.\.$")


def messages(stream, cwd):
    """stderr (or stdout) as text, the run's own directory replaced, volatile lines out."""
    text = stream.decode("utf-8", "replace").replace(str(cwd), "<CWD>")
    return [line for line in text.splitlines() if not VOLATILE.match(line)]


def outputs(cwd):
    """What the pipeline made in cwd/out, in forms that do not carry dates or commands."""
    out = os.path.join(cwd, "out")
    bam = os.path.join(out, "sample.bam")
    view = subprocess.run(["samtools", "view", bam], stdout=subprocess.PIPE, check=True,
                          env=dict(os.environ, ARV_WRAP_DISABLE="1")).stdout
    header = subprocess.run(["samtools", "view", "-H", "--no-PG", bam], stdout=subprocess.PIPE,
                            check=True, env=dict(os.environ, ARV_WRAP_DISABLE="1")).stdout
    with gzip.open(os.path.join(out, "calls.vcf.gz"), "rt") as f:
        vcf = [line for line in f
               if not re.match(r"##(bcftools\w*Command|reference)=", line)]
    with open(os.path.join(out, "summary.txt")) as f:
        summary = f.read()
    return {
        "alignments": view,
        "bam header": [line for line in header.decode().splitlines() if not line.startswith("@PG")],
        "vcf": vcf,
        "summary": summary,
    }


def summary_lines(stdout):
    return [line for line in stdout.decode().splitlines() if line.startswith("align: ")]


class Unwrapped:
    """Each driver's run without arv-wrap, made once per session when first asked for."""

    def __init__(self, base, env):
        self.base, self.env, self.done = base, env, {}
        self._classes = None

    def classes(self):
        """Driver.java compiled, as a user would before running it."""
        if self._classes is None:
            need("javac")
            path = self.base / "java-classes"
            subprocess.run(["javac", "-d", str(path), os.path.join(ALIGN, "Driver.java")],
                           env=self.env, check=True, timeout=120)
            self._classes = str(path)
        return self._classes

    def get(self, driver, failing):
        key = (driver, failing)
        if key not in self.done:
            classes = self.classes() if driver == "java" else None
            cwd = self.base / driver / ("fail" if failing else "ok")
            reads = MISSING if failing else ()
            result = run(command(driver, classes, reads), cwd, self.env)
            self.done[key] = (cwd, result, None if failing or result.returncode else outputs(cwd))
        return self.done[key]


@pytest.fixture(scope="session")
def unwrapped(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARV_WRAP_")}
    env.pop("LD_PRELOAD", None)
    return Unwrapped(tmp_path_factory.mktemp("align-unwrapped"), env)


def backend_param(name):
    marks = []
    if name not in backends.KNOWN:
        marks.append(pytest.mark.skip(reason=f"arv-wrap has no {name} backend yet"))
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [backend_param("local"), backend_param("slurm")]


@pytest.fixture(scope="module")
def slurm_cluster():
    """The cluster of scripts/slurm-cluster.sh: brought up when we are root."""
    need("srun")
    script = os.path.join(ROOT, "scripts", "slurm-cluster.sh")
    if subprocess.run(["bash", script, "status"], capture_output=True, timeout=60).returncode:
        if os.geteuid() == 0:
            proc = subprocess.run(["bash", script, "up"], capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        elif ON_CI:
            pytest.fail("the Slurm cluster is not up and we are not root to start it")
        else:
            pytest.skip("the Slurm cluster is not up and we are not root to start it")


def prerequisites(request, driver, backend):
    for program in ("bwa", "samtools", "bcftools", *NEEDS[driver]):
        need(program)
    if backend == "slurm":
        request.getfixturevalue("slurm_cluster")


def job_records(env, backend):
    records = [r for r in jobs(env) if r["kind"] == "job"]
    assert all(r["backend"] == backend for r in records), records
    return records


def calls(records):
    return sorted((r["argv"][0], r["argv"][1] if len(r["argv"]) > 1 else None) for r in records)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("driver", DRIVERS)
def test_align_wrapped_matches_unwrapped(request, driver, backend, unwrapped, base_env,
                                          tmp_path):
    prerequisites(request, driver, backend)
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"   # bwa -t 2 | samtools sort -@ 2 on 2 CPUs
    plain_cwd, plain, expected = unwrapped.get(driver, failing=False)
    assert plain.returncode == 0, plain.stderr.decode()

    classes = unwrapped.classes() if driver == "java" else None
    cwd = tmp_path / "run"
    wrapped = run(command(driver, classes), cwd, base_env, wrap=(WHITELIST[driver], backend))
    assert wrapped.returncode == 0, wrapped.stderr.decode()

    # The same results: alignments, calls, summary (and what the pipeline printed).
    got = outputs(cwd)
    for key in expected:
        assert got[key] == expected[key], f"{driver}: {key} differs from the unwrapped run"
    assert summary_lines(wrapped.stdout) == summary_lines(plain.stdout)
    assert "12 of 12 planted SNPs found, 12 with the planted genotype" in got["summary"]

    # Every heavy step was a job that ended well; the quick calls are not there.
    records = job_records(base_env, backend)
    assert calls(records) == HEAVY, calls(records)
    assert all(r["state"] == "exited" and r["exit_status"] == 0 for r in records), records
    assert not QUICK & set(calls(records))
    threads = {tuple(r["argv"][:2]): r["cpus"] for r in records}
    assert threads[("bwa", "mem")] == threads[("samtools", "sort")] == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("driver", DRIVERS)
def test_align_failing_step_fails_the_same_way(request, driver, backend, unwrapped, base_env,
                                                tmp_path):
    """Reads that do not exist: bwa mem fails (a job), samtools sort sees no header
    (a job), the driver stops: the same exit status and the same messages."""
    prerequisites(request, driver, backend)
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"
    plain_cwd, plain, _ = unwrapped.get(driver, failing=True)
    assert plain.returncode != 0
    plain_err = messages(plain.stderr, plain_cwd)
    assert "[E::main_mem] fail to open file `missing/reads_1.fq'." in plain_err

    classes = unwrapped.classes() if driver == "java" else None
    cwd = tmp_path / "run"
    wrapped = run(command(driver, classes, MISSING), cwd, base_env,
                  wrap=(WHITELIST[driver], backend))
    assert wrapped.returncode == plain.returncode
    assert messages(wrapped.stderr, cwd) == plain_err
    assert summary_lines(wrapped.stdout) == summary_lines(plain.stdout) == []

    # The failing step ran as jobs, and failed there; nothing after it ran.
    records = job_records(base_env, backend)
    by_call = {tuple(r["argv"][:2]): r for r in records}
    assert by_call[("bwa", "mem")]["exit_status"] == 1
    assert by_call[("samtools", "sort")]["exit_status"] == 1
    assert by_call[("bwa", "index")]["exit_status"] == 0
    assert not {("samtools", "index"), ("bcftools", "mpileup")} & set(by_call)


def test_align_five_drivers_are_one_pipeline(unwrapped):
    """Without arv-wrap, the five drivers make the same alignments, calls and summary."""
    for program in ("bwa", "samtools", "bcftools", *sum(NEEDS.values(), [])):
        need(program)
    results = {driver: unwrapped.get(driver, failing=False) for driver in DRIVERS}
    for driver, (_, result, _) in results.items():
        assert result.returncode == 0, f"{driver}: {result.stderr.decode()}"
    first = results["bash"][2]
    for driver, (_, _, got) in results.items():
        assert got == first, f"{driver} and bash differ"


@pytest.mark.parametrize("driver, backend", [("bash", "local"), ("make", "local"),
                                             ("bash", "slurm")])
def test_align_second_run_reuses_every_heavy_step_with_identical_outputs(
        request, driver, backend, base_env, tmp_path):
    """`arv-wrap --reuse` twice, the output dir removed between: the second run runs
    none of the heavy steps (each is a job that reused the first run's), and leaves
    the same files, byte for byte."""
    prerequisites(request, driver, backend)
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"
    cwd = tmp_path / "run"
    cwd.mkdir()
    argv = command(driver, None)
    wrap = ["-w", WHITELIST[driver], "-b", backend, "--reuse", "--"]
    first = arv_wrap(*wrap, *argv, cwd=cwd, env=base_env, capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr.decode()
    os.rename(cwd / "out", cwd / "first")
    second = arv_wrap(*wrap, *argv, cwd=cwd, env=base_env, capture_output=True, timeout=300)
    assert second.returncode == 0, second.stderr.decode()
    assert summary_lines(second.stdout) == summary_lines(first.stdout) != []

    records = job_records(base_env, backend)
    ran = {r["id"]: r for r in records if r["reused_from"] is None}
    reused = [r for r in records if r["reused_from"] is not None]
    assert calls(ran.values()) == calls(reused) == HEAVY
    assert all(ran[r["reused_from"]]["argv"] == r["argv"] for r in reused)
    for root, _, names in os.walk(cwd / "first"):
        for name in names:
            before = os.path.join(root, name)
            after = os.path.join(cwd / "out", os.path.relpath(before, cwd / "first"))
            with open(before, "rb") as a, open(after, "rb") as b:
                assert a.read() == b.read(), f"{after} differs from the first run's"
