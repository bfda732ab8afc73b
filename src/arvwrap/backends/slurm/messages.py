"""What srun -v says on its stderr about one job, read line by line (Attempt).

srun's own messages, the relay's (its usage line, a failure to reach the
dispatcher) and slurmstepd's arrive interleaved on srun's stderr; nothing here is
ever shown to the caller."""
import re

from arvwrap import paths

# srun -v lines (its own, on its stderr)
RE_QUEUED = re.compile(r"^srun: job (\d+) queued and waiting for resources")
RE_ALLOCATED = re.compile(r"^srun: (?:jobid (\d+): nodes|job (\d+) has been allocated resources)")
RE_STATUS = re.compile(r"Received task exit notification for \d+ task of StepId=(\d+)\.\d+ "
                       r"\(status=0x([0-9a-fA-F]+)\)")
RE_CANCELLED = re.compile(r"\*\*\* (?:STEP|JOB) (\d+)(?:\.\d+)? ON \S+ CANCELLED AT \S+"
                          r"(?: DUE TO (.*?))?(?: \*\*\*|$)")
RE_MEMORY = re.compile(r"exceeded (?:job )?memory limit|oom-kill|out of memory", re.I)
RE_REFUSED = re.compile(r"Unable to allocate resources: (.*)")
RE_CONTROLLER = re.compile(r"Unable to contact slurm controller|Slurm controller not responding|"
                           r"Socket timed out on send/recv|Communication connection failure|"
                           r"Unable to establish Slurm connection", re.I)
RE_ERROR = re.compile(r"^(?:srun|slurmstepd[-\w]*): error: (.*)")
RE_USAGE = re.compile(r"^arv-wrap-relay: usage (\d+) (\d+) (\d+)$")
RE_RELAY = re.compile(r"^arv-wrap-relay: (.*)")
RE_EXEC_FAILED = re.compile(r"execve\(\): (.*)")
# the node was set down or stopped answering: srun then exits 0 without the task's status
RE_NODE_FAILED = re.compile(r"^srun: error: Node failure on (\S+)")


class Attempt:
    """What srun has said so far about one job."""

    def __init__(self):
        self.slurm_id = None
        self.allocated = False
        self.wait_status = None
        self.cancelled = None        # None, or Slurm's reason ("" for a plain cancel)
        self.memory = False
        self.refused = None
        self.controller = None
        self.relay_error = None
        self.no_relay = None         # the node could not run the relay (not on a shared fs?)
        self.node_failed = None      # the node Slurm lost under the job
        self.usage = {}              # what the tool used, as the relay measured it
        self.errors = []
        self.in_options = False      # inside srun -v's echo of its options

    def read(self, line):
        # srun -v first echoes its options, the job's cwd and name among them: never
        # read those as messages (a directory named like one must not fake a status)
        if self.in_options or line == "srun: defined options":
            self.in_options = line != "srun: end of defined options"
            return
        m = RE_QUEUED.match(line)
        if m:
            self.slurm_id = self.slurm_id or m.group(1)
            return
        m = RE_ALLOCATED.match(line)
        if m:
            self.slurm_id = self.slurm_id or m.group(1) or m.group(2)
            self.allocated = True
            return
        m = RE_STATUS.search(line)
        if m:
            self.wait_status = int(m.group(2), 16)
            return
        m = RE_CANCELLED.search(line)
        if m:
            self.cancelled = (m.group(2) or "").strip()
            return
        if RE_MEMORY.search(line):
            self.memory = True
        m = RE_USAGE.match(line)
        if m:
            utime, stime, maxrss = (int(g) for g in m.groups())
            self.usage = {"cpu_seconds": round((utime + stime) / 1e6, 3),
                          "max_rss": maxrss * 1024}
            return
        m = RE_RELAY.match(line)
        if m:
            self.relay_error = m.group(1)
            return
        m = RE_NODE_FAILED.match(line)
        if m:
            self.node_failed = m.group(1)
            return
        if RE_CONTROLLER.search(line):
            self.controller = line.split("error: ", 1)[-1].strip()
        m = RE_REFUSED.search(line)
        if m and not RE_CONTROLLER.search(m.group(1)):
            self.refused = m.group(1).strip()
        m = RE_ERROR.match(line)
        if m:
            self.errors.append(m.group(1).strip())
            failed = RE_EXEC_FAILED.match(m.group(1))
            if failed and failed.group(1).startswith(paths.HELPER + ":"):
                self.no_relay = failed.group(1).strip()
