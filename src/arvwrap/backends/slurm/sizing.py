"""How big a job may be on the cluster: the largest node of its partition, less what
the Slurm job that made the call holds there when it waits on the only node, and
the rule's on_oversize when the request is larger."""
import math
import subprocess

from arvwrap.backends import BackendError
from arvwrap.backends.slurm.cluster import _mib
from arvwrap.backends.slurm.settings import MIB
from arvwrap.jobspec import Outcome, on_oversize


def largest_node(cluster, partition):
    rows = cluster.nodes()
    mine = [r for r in rows if (r[0] == partition if partition else r[4])] or rows
    limits = [r[3] for r in mine]
    return {"cpus": max(r[1] for r in mine), "memory": max(r[2] for r in mine),
            "time": None if None in limits else max(limits),
            "nodes": sorted({r[5] for r in mine})}

def held_by_caller(cluster, job, big):
    """(Slurm job id, cpus, memory bytes) that the Slurm job this call was made in
    holds on the only node of the call's partition, or None. A driver run as a
    job (--as-job, nested, an sbatch script) waits for its tools: there a tool can
    only ever get what the driver leaves, and asking more would wait for ever."""
    env = job.env
    try:
        cpus = int(env[b"SLURM_JOB_CPUS_PER_NODE"])     # "2(x3)" for several nodes
        slurm_id = env[b"SLURM_JOB_ID"].decode()
    except (KeyError, ValueError):
        return None
    if big["nodes"] != [env.get(b"SLURM_JOB_NODELIST", b"").decode()]:
        return None
    # MiB: what it asked for, else the cluster's default per CPU, else none known
    per_cpu = env.get(b"SLURM_MEM_PER_CPU") or cluster.config_value("DefMemPerCPU")
    memory = _mib(env.get(b"SLURM_MEM_PER_NODE")) or cpus * _mib(per_cpu)
    return slurm_id, cpus, memory * MIB

def fit(backend, job):
    """Apply on_oversize against the largest node of the job's partition; None if it fits."""
    partition = backend.options(job).partition
    where = f"partition {partition}" if partition else "the cluster"
    offerer = f"the largest node of {where}"
    try:
        big = largest_node(backend.cluster, partition)
        held = held_by_caller(backend.cluster, job, big)
    except subprocess.TimeoutExpired:
        text = f"the slurm controller did not answer within {backend.cluster.timeout:g}s (sinfo)"
        return Outcome("failed", run_locally=True, reason=text, message=text)
    except (BackendError, OSError):
        return None       # let Slurm itself judge the request
    if held:
        slurm_id, cpus, memory = held
        offerer = (f"the only node of {where} beside Slurm job {slurm_id}, which made "
                   f"this call and waits for it,")
        big = dict(big, cpus=big["cpus"] - cpus, memory=big["memory"] - memory)
        if big["cpus"] < 1 or big["memory"] <= 0:
            text = (f"{job.tool} would wait for ever: Slurm job {slurm_id}, which made "
                    f"this call and waits for it, holds all the CPUs or memory of the "
                    f"only node of {where}")
            return Outcome("failed", reason=text, message=text)
    too_big = []
    if math.ceil(job.cpus) > big["cpus"]:
        too_big.append(("cpus", f"{job.cpus:g} CPUs", f"{big['cpus']} CPUs"))
    if job.memory and job.memory > big["memory"]:
        too_big.append(("memory", f"{job.memory // MIB} MiB of memory",
                        f"{big['memory'] // MIB} MiB"))
    if job.time_limit and big["time"] and job.time_limit > big["time"]:
        too_big.append(("time", f"a time limit of {job.time_limit}s", f"{big['time']}s"))
    refused = on_oversize(job, too_big, offerer)
    if refused or not too_big:
        return refused
    job.cpus = min(job.cpus, big["cpus"])
    if job.memory:
        job.memory = min(job.memory, big["memory"])
    if job.time_limit and big["time"]:
        job.time_limit = min(job.time_limit, big["time"])
    return None
