"""The Slurm cluster as arv-wrap asks it: its commands (sinfo, squeue, scancel,
scontrol), counted, each bounded by the controller timeout; the nodes (cached 60 s)
and the controller's configuration (read once); where the nodes reach this host."""
import os
import re
import socket
import subprocess
import threading
import time

from arvwrap.backends import BackendError
from arvwrap.backends.slurm.messages import RE_CONTROLLER
from arvwrap.backends.slurm.settings import MIB


class Counters:
    """What the backend asked of Slurm, for `arv-wrap doctor` and the bench."""

    def __init__(self):
        self.lock = threading.Lock()
        self.submissions = 0       # srun started
        self.status_queries = 0    # squeue calls
        self.cancels = 0           # scancel calls
        self.other_queries = 0     # sinfo / scontrol ping
        self.max_in_flight = 0

    def add(self, name, n=1):
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self):
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class Cluster:
    def __init__(self, tools, timeout, poll_interval):
        self.tools = tools               # name -> path of srun, squeue, ...
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.counters = Counters()
        self.trouble_at = None     # when a Slurm command last found no controller
        self._nodes = None
        self._nodes_at = 0.0
        self._nodes_lock = threading.Lock()
        self._nodes_failed_until = 0.0
        self._config = None
        self._config_lock = threading.Lock()

    def nodes(self):
        """[(partition, cpus, memory bytes, max time s or None, default?, node)], cached 60 s;
        one sinfo at a time, whatever the number of jobs asking."""
        with self._nodes_lock:
            now = time.monotonic()
            if self._nodes is not None and now - self._nodes_at < 60:
                return self._nodes
            if now < self._nodes_failed_until:     # the controller just did not answer
                raise subprocess.TimeoutExpired("sinfo", self.timeout)
            try:
                return self._read_nodes()
            except subprocess.TimeoutExpired:
                self._nodes_failed_until = time.monotonic() + max(self.poll_interval, 5.0)
                raise

    def _read_nodes(self):
        out = self.run("sinfo", ["-h", "-N", "-o", "%P %c %m %l %N"], timeout=self.timeout,
                        counter="other_queries")
        rows = []
        for line in out.stdout.splitlines():
            fields = line.split()
            if len(fields) != 5:
                continue
            part, cpus, mem, limit, node = fields
            try:
                rows.append((part.rstrip("*"), int(cpus), int(mem.rstrip("+")) * MIB,
                             parse_slurm_time(limit), part.endswith("*"), node))
            except ValueError:
                continue
        if not rows:
            raise BackendError(f"slurm: sinfo lists no nodes ({out.stderr.strip()})")
        self._nodes, self._nodes_at = rows, time.monotonic()
        return rows

    def config(self):
        """`scontrol show config`, read once ("" while the controller does not answer)."""
        with self._config_lock:
            if self._config is None:
                try:
                    out = self.run("scontrol", ["show", "config"],
                                    timeout=min(self.timeout, 5), counter="other_queries")
                except (subprocess.TimeoutExpired, OSError):
                    return ""
                self._config = out.stdout if out.returncode == 0 else None
            return self._config or ""

    def config_value(self, key):
        m = re.search(rf"^{key}\s*=\s*(\S+)", self.config(), re.M)
        return m and m.group(1)

    def own_address(self):
        """Where the nodes reach this host: its address on the route to the controller.
        Its name is only the fallback: Debian maps a host's own name to 127.0.1.1,
        which would send every node to itself."""
        controller = controller_address(self.config())
        return (controller and route_address(*controller)) or _name_address()

    def run(self, tool, args, timeout, counter):
        self.counters.add(counter)
        return subprocess.run([self.tools[tool], *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def scancel(self, ids=(), name=None, signum=None):
        args = []
        if signum:
            args.append(f"--signal={signum}")
        if name:
            args.append(f"--name={name}")
        args += [str(i) for i in ids]
        try:
            done = self.run("scancel", args, timeout=self.timeout, counter="cancels")
        except (subprocess.TimeoutExpired, OSError):
            done = None
        if done is None or RE_CONTROLLER.search(done.stderr):
            self.trouble_at = time.monotonic()
        return done

    def poll(self, ids):
        """{slurm id: (state, job name)} of every job of ours that squeue lists; None
        if it failed."""
        try:
            out = self.run("squeue", ["-h", "-u", str(os.getuid()), "-o", "%i %T %j"],
                            timeout=self.timeout, counter="status_queries")
        except (subprocess.TimeoutExpired, OSError):
            out = None
        if out is None or out.returncode != 0:
            self.trouble_at = time.monotonic()
            return None
        known = {}
        for line in out.stdout.splitlines():
            fields = line.split(None, 2)
            if len(fields) == 3:
                known[fields[0]] = (fields[1], fields[2])
        return known


def controller_address(config):
    """(host, port) of the primary controller in `scontrol show config`, or None."""
    host = re.search(r"^SlurmctldHost\[0\]\s*=\s*([^\s(]+)(?:\(([^)\s]+)\))?", config, re.M)
    port = re.search(r"^SlurmctldPort\s*=\s*(\d+)", config, re.M)
    if not host:
        return None
    return host.group(2) or host.group(1), int(port.group(1)) if port else 6817

def route_address(host, port):
    """This host's IPv4 address on the route to host (a UDP connect sends nothing)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, socket.AF_INET,
                                                          socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(addr)
            return probe.getsockname()[0]
    except OSError:
        return None

def _name_address():
    """This host's address as its name resolves (the nodes resolve nothing per job)."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name

def _mib(value):
    """A whole number of MiB from Slurm's environment or config; 0 if it is not one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0

def parse_slurm_time(text):
    """Seconds from sinfo's %l ([days-]hours:minutes:seconds, or 'infinite')."""
    if text in ("infinite", "UNLIMITED", "n/a"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s
