"""The Docker backend: every redirected call runs in a container of its rule's image.

Shape of one job
----------------
Through the low-level API of the ``docker`` SDK (docker-py), on the engine that
DOCKER_HOST names (else the local socket):

1. the image of the rule (``image:``) is looked up, and pulled when missing, with
   its progress on the caller's stderr; a pull that fails is exit 125 with one line;
2. a container is created from it: argv exact as entrypoint + command (no shell),
   the caller's cwd as working dir, the job's environment (minus what names the
   host: LD_PRELOAD, PATH), the caller's uid, gid and groups, its rlimits, an init
   process (``init``: without one a signal to PID 1 is ignored), ``nano_cpus``
   and a memory limit, labels naming the job and the dispatcher; the cwd and every
   path argv names are bind mounts at the same paths;
3. its stdio is attached *before* it starts (so no first frame is lost), with
   OpenStdin and StdinOnce set when the caller's stdin is forwarded: closing our
   write side is then the tool's EOF (a detached container made by docker-py's
   high-level API has StdinOnce false, and never sees the end of its input);
4. it starts; one thread demultiplexes the attach stream (8-byte frame headers:
   stream id, length) into the caller's fds 1 and 2 as it arrives, one pumps the
   caller's stdin into it, one waits for its exit; this thread steers it
   (signals, cancel, time limit) and removes it at the end, whatever happens.

A dispatcher that dies leaves its containers running; the next backend to take a
job on this host removes every container labelled with a dispatcher pid that is
no longer a dispatcher (`reap`).
"""
import os
import resource
import select
import signal
import socket
import stat
import struct
import threading
import time

from arvwrap import paths
from arvwrap.backends import BackendError, base
from arvwrap.backends.remote import guard
from arvwrap.backends.remote.fds import close, received, write_all
from arvwrap.backends.remote.streams import Log
from arvwrap.jobspec import Outcome, on_oversize

MIB = 1 << 20
KILL_GRACE = 5.0          # s between SIGTERM and SIGKILL when arv-wrap ends a container
STREAM_GRACE = 5.0        # s to wait for the rest of the output after the container exited
INFO_TTL = 60.0           # s the engine's CPUs and memory are cached
MIN_CPUS = 0.01           # the engine refuses less (nano_cpus >= 1e7)
MIN_MEMORY = 6 * MIB      # the engine refuses a smaller memory limit
LABEL_JOB = "arv-wrap.job"
LABEL_DISPATCHER = "arv-wrap.dispatcher"            # its pid
LABEL_STARTED = "arv-wrap.dispatcher-started"      # its start time (so a reused pid is not it)
LABEL_HOST = "arv-wrap.host"                       # pids mean something on one host only
# never bind-mounted over the image: its own system (and the engine's pseudo-filesystems)
SYSTEM_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
               "/proc", "/run", "/sbin", "/sys", "/usr", "/usr/bin", "/usr/lib",
               "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/sbin", "/usr/share", "/var"}
PSEUDO_FS = ("/proc/", "/sys/", "/dev/")
RLIMIT_NAMES = {getattr(resource, f"RLIMIT_{n.upper()}"): n for n in (
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
    "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")
    if hasattr(resource, f"RLIMIT_{n.upper()}")}

# What of the caller's process state reaches the tool in its container, for `arv-wrap check`.
PROCESS_STATE = (
    "crosses into the container: argv (argv[0] is the program, found on the image's PATH "
    "unless it has a '/'), cwd (bind-mounted, as are the paths argv names, TMPDIR and their "
    "directories, outside the image's system dirs), environment (minus LD_PRELOAD and PATH: "
    "the image's PATH and its other variables apply), uid, gid and groups (read from the "
    "calling process), rlimits; cpus as a fractional CPU quota, memory as its limit",
    "does not cross: umask (the engine gives 022), descriptors other than 0-2 (a /dev/fd "
    "argument runs the call on the local backend), nice, signal mask and ignored signals, "
    "CPU affinity, cgroup, namespaces (its own pid, mount, uts and network ones), "
    "oom_score_adj, no_new_privs; non-UTF-8 environment entries; the rest of the host's "
    "files (HOME too) unless argv names them; the shim (a nested job's tools run inside it)",
    "stdout and stderr are relayed by the engine (a reader gone: the tool gets SIGPIPE); "
    "stdin is pumped in as the rule's stdin says, so a pipe is read ahead; an exit status "
    "129..192 reads as death by signal status-128 (the engine reports both alike)",
)


class Backend(base.Backend):
    name = "docker"
    carries_descriptors = False
    fractional_cpus = True          # nano_cpus: cpus: 0.5 is half a CPU
    relays_streams = True
    shared_filesystem = False       # the engine is on this host: bind mounts
    process_state = PROCESS_STATE
    job_noun = "a container"

    def __init__(self, config=None, state_dir=None):
        super().__init__(config, state_dir)
        try:
            import docker
        except ImportError:
            raise BackendError("docker: the docker Python SDK is not installed "
                               "(pip install docker)") from None
        self.errors = docker.errors
        try:
            self.api = docker.APIClient(version="auto", max_pool_size=64,
                                        **docker.utils.kwargs_from_env())
        except docker.errors.DockerException as e:
            raise BackendError(f"docker: the engine does not answer: {one_line(e)}") from None
        if not self.api.base_url.startswith(("http+docker://localhost", "http://")):
            # the attach stream is read from the raw descriptor: TLS or ssh would wrap it
            raise BackendError(f"docker: only a unix socket or plain tcp:// engine will do, "
                               f"not {os.environ.get('DOCKER_HOST')}")
        self.host = socket.gethostname()
        self.log_dir = os.path.join(state_dir or paths.state_dir(), "logs")  # `arv-wrap logs`
        self.lock = threading.Lock()
        self.pulls = {}           # image -> lock: one pull at a time per image
        self.info = None
        self.info_at = 0.0
        self.reaped = False
        self.unremoved = set()    # containers the engine could not remove when they ended
        self.remover = None

    def cleaning(self):
        """Containers still to remove (the engine was away when their jobs ended)."""
        with self.lock:
            return bool(self.unremoved)

    def remove_later(self, container_id):
        """Retry the removal every 2 s while the engine is away (up to 10 minutes)."""
        with self.lock:
            self.unremoved.add(container_id)
            if self.remover is not None:
                return
            self.remover = threading.Thread(target=self._remove_later, daemon=True)
        self.remover.start()

    def _remove_later(self):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(2)
            with self.lock:
                pending = set(self.unremoved)
            for container_id in pending:
                try:
                    self.api.remove_container(container_id, force=True, v=True)
                except self.errors.NotFound:
                    pass
                except Exception:
                    continue
                with self.lock:
                    self.unremoved.discard(container_id)
            with self.lock:
                if not self.unremoved:
                    break
        with self.lock:
            self.remover = None

    # -- answers --
    def check(self):
        try:
            version = self.api.version()
            cpus, memory = self.largest()
        except Exception as e:
            raise BackendError(f"docker: the engine does not answer: {one_line(e)}") from None
        return (f"docker: engine {version.get('Version')} (API {version.get('ApiVersion')}); "
                f"{cpus:g} CPUs, {memory // MIB} MiB")

    @classmethod
    def doctor_checks(cls, load, rules):
        """Which images the whitelist names are not on the engine."""
        images = named_images(rules)
        if not images:
            return [(True, "images: the whitelist names none (the docker backend needs one "
                           "per rule)")]
        try:
            missing = load().missing_images(images)
        except Exception as e:
            return [(False, f"images: cannot ask the engine: {e}")]
        if missing:
            return [(False, f"images missing on the engine (pulled on first use when a "
                            f"registry answers): {', '.join(missing)}")]
        return [(True, f"images: all {len(images)} the whitelist names are there")]

    @classmethod
    def doctor_probe(cls, load, rules):
        """`sh -c true` in an image the whitelist names that the engine holds."""
        try:
            missing = set(load().missing_images(named_images(rules)))
        except Exception:
            missing = set(named_images(rules))
        images = [i for i in named_images(rules) if i not in missing]
        if not images:
            return "round trip skipped: no image of the whitelist is on the engine"
        return "sh", ["sh", "-c", "true"], f"\n    image: '{images[0]}'"

    def missing_images(self, images):
        """Those of images the engine does not hold (for `arv-wrap doctor`)."""
        missing = []
        for image in images:
            try:
                self.api.inspect_image(image)
            except self.errors.ImageNotFound:
                missing.append(image)
        return missing

    def largest(self):
        """(cpus, memory bytes) the engine offers one container: all of its machine."""
        with self.lock:
            if self.info is None or time.monotonic() - self.info_at > INFO_TTL:
                self.info, self.info_at = self.api.info(), time.monotonic()
            return float(self.info["NCPU"]), int(self.info["MemTotal"])

    def fit(self, job):
        """Apply on_oversize against the engine; None if the job may run."""
        cpus, memory = self.largest()
        too_big = []
        if job.cpus > cpus + 1e-9:
            too_big.append(("cpus", f"{job.cpus:g} CPUs", f"{cpus:g} CPUs"))
        if job.memory and job.memory > memory:
            too_big.append(("memory", f"{job.memory // MIB} MiB of memory",
                            f"{memory // MIB} MiB"))
        refused = on_oversize(job, too_big, "the docker engine")
        if refused:
            return refused
        job.cpus = min(job.cpus, cpus)
        job.memory = job.memory and min(job.memory, memory)
        if job.cpus < MIN_CPUS:
            job.notes.append(f"cpus raised from {job.cpus:g} to {MIN_CPUS}, "
                             f"the least docker gives")
            job.cpus = MIN_CPUS
        if job.memory and job.memory < MIN_MEMORY:
            job.notes.append(f"memory raised to {MIN_MEMORY // MIB} MiB, the least docker gives")
            job.memory = MIN_MEMORY
        return None

    # -- one job --
    def run(self, job, started):
        image = getattr(job.rule, "image", None)
        if not image:
            text = f"{job.tool}: its rule names no image (the docker backend needs `image:`)"
            return Outcome("failed", reason=text, message=text)
        try:
            self.reap_once()
            refused = self.fit(job) or self.ensure_image(image, job)
        except (self.errors.DockerException, OSError) as e:
            return engine_trouble(e)
        if refused:
            return refused
        if job.cancel_reason or job.first_signal():
            return cancelled_before_start(job)
        try:
            spec = container_spec(job, image, self.labels(job), self.api.create_host_config)
        except NotText as e:
            text = f"{job.tool}: {e}: a container cannot carry it"
            return Outcome("failed", reason=text, message=text)
        return Container(self, job, started, spec).run()

    def labels(self, job):
        return {LABEL_JOB: job.id, LABEL_DISPATCHER: str(os.getpid()),
                LABEL_STARTED: str(start_time(os.getpid())), LABEL_HOST: self.host}

    def ensure_image(self, image, job):
        """None once the image is here (pulled if need be), else the refusal."""
        if self.has_image(image):
            return None
        with self.lock:
            pull_lock = self.pulls.setdefault(image, threading.Lock())
        with pull_lock:                  # another job may be pulling it right now
            if self.has_image(image):
                return None
            try:
                self.pull(image, job.fds.get(2))
            except self.errors.DockerException as e:
                text = f"image {image} is not here and cannot be pulled: {one_line(e)}"
                return Outcome("failed", reason=text, message=text)
        return None

    def has_image(self, image):
        try:
            self.api.inspect_image(image)
            return True
        except self.errors.ImageNotFound:
            return False

    def pull(self, image, err_fd):
        """Pull image, one `arv-wrap:` line on err_fd per layer and step."""
        from docker.utils import parse_repository_tag
        repo, tag = parse_repository_tag(image)
        said = set()
        for event in self.api.pull(repo, tag=tag or "latest", stream=True, decode=True):
            if "error" in event:
                raise self.errors.APIError(event["error"])
            line = " ".join(str(event[k]) for k in ("id", "status") if event.get(k))
            if line and line not in said and err_fd is not None:
                said.add(line)
                write_all(err_fd, f"arv-wrap: pulling {image}: {line}\n".encode())

    def reap_once(self):
        with self.lock:
            if self.reaped:
                return
            self.reaped = True
        self.reap()

    def abandoned(self, _records):
        """Jobs a killed dispatcher held: remove their containers (and any other a
        dead dispatcher on this host left)."""
        self.reap_once()

    def reap(self):
        """Remove the containers that a dead dispatcher on this host left behind."""
        for found in self.api.containers(all=True, filters={"label": LABEL_JOB}):
            labels = found.get("Labels") or {}
            if labels.get(LABEL_HOST) != self.host or dispatcher_alive(labels):
                continue
            try:
                self.api.remove_container(found["Id"], force=True, v=True)
            except self.errors.NotFound:
                pass


class Container:
    """One job's container, from creation to removal."""

    def __init__(self, backend, job, started, spec):
        self.api, self.errors = backend.api, backend.errors
        self.backend = backend
        self.log_dir = backend.log_dir
        self.job, self.started, self.spec = job, started, spec
        self.id = None
        self.label = job.tool
        self.events_r, self.events_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.events_lock = threading.Lock()
        self.exit = None          # the engine's wait answer, once it exited
        self.copier = None
        self.pump = None
        self.failure = guard.JobFailure(job)   # arv-wrap's own threads failed it
        self.sock = self.raw = None

    def run(self):
        job = self.job
        stdin = stdin_source(job)
        try:
            try:
                self.create(stdin is not None)
            except (self.errors.DockerException, OSError) as e:
                return engine_trouble(e, self.id is not None)
            self.started(self.id[:12])
            self.copier = Demux(self.sock, job.fds.get(1), job.fds.get(2), self.notify,
                                f"the output of job {job.id}", self.failure,
                                os.path.join(self.log_dir, f"{job.id}.stderr"))
            if stdin is not None:
                self.pump = Pump(stdin, self.sock, f"the stdin of job {job.id}", self.failure)
            guard.start(f"the wait for job {job.id}", self.wait, on_crash=self.failure)
            return self.steer()
        finally:
            self.cleanup(stdin)

    def create(self, with_stdin):
        config = self.api.create_container_config(**self.spec)
        # StdinOnce: the engine closes the tool's stdin when our attach closes its input
        config.update(OpenStdin=with_stdin, StdinOnce=with_stdin, AttachStdin=with_stdin)
        name = f"arv-wrap-{self.job.id}"
        self.id = self.api.create_container_from_config(config, name=name)["Id"]
        self.label = f"container {self.id[:12]} ({self.job.tool})"
        params = {"stdout": 1, "stderr": 1, "stream": 1, "stdin": int(with_stdin)}
        self.raw = self.api.attach_socket(self.id, params=params)
        # our own blocking socket on the same connection: docker-py's has a timeout
        # (so it is non-blocking underneath) and reads through a buffer we bypass
        self.sock = socket.socket(fileno=os.dup(self.raw.fileno()))
        self.sock.setblocking(True)
        self.api.start(self.id)

    def wait(self):
        """The exit, from the engine (a connection of its own, without a timeout)."""
        try:
            self.exit = self.api.wait(self.id, timeout=None)
        except Exception as e:           # the engine went away: the job is lost
            self.exit = {"StatusCode": None, "Error": {"Message": one_line(e)}}
        self.notify()

    def notify(self):
        with self.events_lock:        # never into a closed (maybe reused) descriptor
            if self.events_w is not None:
                try:
                    os.write(self.events_w, b"!")
                except OSError:
                    pass

    def steer(self):
        """Forward signals, apply cancel and time limit, until it exited and its output
        is copied; then the outcome."""
        job = self.job
        poller = select.poll()
        for fd in (job.wake_fd, self.events_r):
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + job.time_limit if job.time_limit else None
        why = None                # arv-wrap's reason for ending it
        kill_at = cut_at = None
        piped = False
        while True:
            now = time.monotonic()
            if self.exit is not None and not self.copier.done.is_set():
                cut_at = cut_at or now + STREAM_GRACE
                if now >= cut_at:
                    self.copier.cut()
            if self.exit is not None and self.copier.done.is_set():
                break
            for signum in job.take_signals():
                self.kill(signum)
            if why is None and job.cancel_reason:
                why = job.cancel_reason
            if why is None and deadline and now >= deadline:
                why = f"{job.tool} exceeded its time limit of {job.time_limit}s"
            if why is None and self.failure.reason:
                why = self.failure.reason
            if why is not None and kill_at is None:
                self.kill(signal.SIGTERM)
                kill_at = now + KILL_GRACE
            if kill_at is not None and now >= kill_at and self.exit is None:
                self.kill(signal.SIGKILL)
                kill_at = float("inf")
            if self.copier.broken and not piped:
                piped = True              # the caller's reader is gone: as a local write would
                self.kill(signal.SIGPIPE)
            waits = [t - now for t in (deadline, kill_at, cut_at) if t and t > now]
            timeout = min(waits + [1.0])
            poller.poll(max(1, int(timeout * 1000)))
            drain(self.events_r)
        return self.outcome(why)

    def kill(self, signum):
        try:
            self.api.kill(self.id, signal=int(signum))
        except (self.errors.DockerException, OSError):
            pass      # it is not running (any more), or the engine is gone: wait() says

    def outcome(self, why):
        job, status = self.job, self.exit.get("StatusCode")
        if why is not None and why == self.failure.reason:
            text = f"{self.label}: {why}"
            return Outcome("failed", reason=text, message=text)
        if status is None:
            text = (f"{self.label}: the engine lost it: "
                    f"{(self.exit.get('Error') or {}).get('Message')}")
            return Outcome("failed", reason=text, message=text)
        died_of = signal_of(status)
        if why is not None and why == job.cancel_reason:
            return Outcome("cancelled", reason=why, caller_signal=died_of or signal.SIGTERM,
                           message=f"job {job.id} ({job.tool}) cancelled: {why}")
        if why is None and status == 128 + signal.SIGKILL and self.oom_killed():
            why = f"{self.label} killed: it exceeded its memory limit of {job.memory // MIB} MiB"
        if died_of:
            return Outcome("signaled", signal=died_of, reason=why, message=why)
        return Outcome("exited", exit_status=status, reason=why, message=why)

    def oom_killed(self):
        try:
            return bool(self.api.inspect_container(self.id)["State"].get("OOMKilled"))
        except self.errors.DockerException:
            return False

    def cleanup(self, stdin):
        for part in (self.pump, self.copier):
            if part is not None:
                part.stop()
        for thing in (self.sock, self.raw):
            try:
                if thing is not None:
                    thing.close()
            except OSError:
                pass
        if self.id is not None:
            try:
                self.api.remove_container(self.id, force=True, v=True)
            except self.errors.NotFound:
                pass
            except Exception:         # DockerException, or requests' when the engine is gone
                self.backend.remove_later(self.id)    # the engine is away: once it is back
        with self.events_lock:
            close(self.events_w)
            self.events_w = None
        close(stdin)
        close(self.events_r)


class Demux:
    """Copies the attach stream into the caller's fds 1 and 2, frame by frame.

    Without a TTY the engine sends frames: one byte of stream id (1 stdout, 2 stderr),
    three zero bytes, a 32-bit big-endian length, then that many bytes."""

    log = None                    # the kept copy of stderr (a streams.Log), if any

    def __init__(self, sock, out_fd, err_fd, wake, what="the output", on_fail=None,
                 log_path=None):
        self.sock = sock
        self.targets = {1: out_fd, 2: err_fd}
        self.wake = wake          # told when it ends, or a reader went away
        self.broken = False       # a target's reader is gone
        self.done = threading.Event()
        if log_path:
            try:
                self.log = Log(log_path)
            except OSError:
                pass              # no copy kept; the stream itself is what matters
        self.thread = guard.start(f"the copy of {what}", self.copy, on_crash=on_fail,
                                  then=self.finished)

    def finished(self):
        if self.log is not None:
            self.log.close()
        self.done.set()
        self.wake()

    def copy(self):
        pending = b""
        for data in received(self.sock):
            pending = self.deliver(pending + data)

    def deliver(self, data):
        """Write every whole frame in data (a partial frame is written as far as it
        goes, so output is live to the byte); returns what is left for the next recv."""
        view, at = memoryview(data), 0
        while len(data) - at >= 8:
            kind, size = struct.unpack_from(">BxxxL", data, at)
            body = view[at + 8:at + 8 + size]
            self.write(kind, body)
            if len(body) < size:        # the rest of this frame comes with the next recv
                return struct.pack(">BxxxL", kind, size - len(body))
            at += 8 + size
        return data[at:]

    def write(self, kind, body):
        if kind == 2 and self.log is not None and body:
            self.keep(bytes(body))
        fd = self.targets.get(kind)
        if fd is None or not body:
            return
        try:
            write_all(fd, body)
        except BrokenPipeError:
            self.targets[kind] = None
            self.broken = True
            self.wake()
        except OSError:
            self.targets[kind] = None

    def keep(self, data):
        try:
            self.log.write(data)
        except OSError:
            self.log.close()
            self.log = None

    def cut(self):
        """Stop waiting for the rest of the output."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self.done.wait(1.0)

    def stop(self):
        if not self.done.is_set():
            self.cut()
        self.thread.join(2.0)


class Pump:
    """Copies the caller's stdin into the container; our write side closed at its end
    is the tool's EOF (the container is stdin_once)."""

    def __init__(self, source, sock, what="stdin", on_fail=None):
        self.source, self.sock = source, sock
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = guard.start(f"the copy of {what}", self.copy, on_crash=on_fail)

    def copy(self):
        poller = select.poll()
        poller.register(self.source, select.POLLIN)
        poller.register(self.stop_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self.stop_r in ready:
                    return
                try:
                    data = os.read(self.source, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    break
                self.sock.sendall(data)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                  # the container stopped reading (it ended)

    def stop(self):
        try:
            os.write(self.stop_w, b"x")
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_WR)   # unblocks a sendall the tool never reads
        except OSError:
            pass
        self.thread.join(2.0)
        close(self.stop_r)
        close(self.stop_w)


# -- what the container is made of --

def container_spec(job, image, labels, host_config):
    """create_container_config's arguments for job (NotText if argv or cwd is not UTF-8);
    host_config: the API's create_host_config (it checks each option against the
    engine's API version)."""
    argv = [text(a, "an argument is not UTF-8") for a in job.argv]
    cwd = text(job.cwd, "its working directory is not UTF-8") if job.cwd else None
    env = container_env(job.env)
    uid, gid, groups = caller_identity(getattr(job, "client_pid", None))
    host = host_config(
        init=True, nano_cpus=round(job.cpus * 1e9),
        mem_limit=job.memory, memswap_limit=job.memory,      # no swap beyond the limit
        mounts=[{"Type": "bind", "Source": p, "Target": p} for p in
                mount_points(cwd, argv[1:], env.get("TMPDIR"))],
        group_add=[str(g) for g in groups if g != gid] or None,
        ulimits=ulimits(job.rlimits) or None,
        log_config={"Type": "none"})     # the output is the caller's: no copy on the engine's disk
    return {"image": image, "entrypoint": [program(argv, os.fsdecode(job.path))],
            "command": argv[1:], "working_dir": cwd, "user": f"{uid}:{gid}",
            "environment": [f"{k}={v}" for k, v in env.items()], "labels": labels,
            "host_config": host}


def program(argv, path):
    """What the container execs: argv[0] (the image's PATH finds a bare name), unless
    it does not name the program (`exec -a`): then the program's own name."""
    if not argv:
        return os.path.basename(path)
    if "/" in argv[0] or os.path.basename(argv[0]) == os.path.basename(path):
        return argv[0]
    return os.path.basename(path)


def container_env(env):
    """The job's environment as text, minus what names the host's programs."""
    out = {}
    for name, value in env.items():
        if name in (b"LD_PRELOAD", b"PATH") or (name.startswith(b"ARV_WRAP_")
                                                 and name != b"ARV_WRAP_JOB"):
            continue            # host libraries, host dirs, the shim's settings
        try:
            out[name.decode()] = value.decode()
        except UnicodeDecodeError:
            continue            # JSON cannot carry it
    return out


def mount_points(cwd, args, tmpdir=None):
    """The host dirs a container must see at the same paths: the cwd, each argument's
    directory (or itself if a dir; also the value of --opt=PATH; the parent of a file
    not made yet), TMPDIR. Nested ones are covered by their ancestor."""
    found = set()
    for candidate in [cwd, tmpdir, *args, *(a.split("=", 1)[1] for a in args if "=" in a)]:
        if not candidate:
            continue
        path = os.path.normpath(os.path.join(cwd or "/", candidate))
        if not os.path.isdir(path):
            if not (os.path.exists(path) or "/" in candidate):
                continue
            path = os.path.dirname(path)
            if not os.path.isdir(path):
                continue
        found.update({path, os.path.realpath(path)})
    found = {p for p in found if p not in SYSTEM_DIRS and not p.startswith(PSEUDO_FS)}
    return sorted(p for p in found
                  if not any(p.startswith(q.rstrip("/") + "/") for q in found if q != p))


def caller_identity(pid):
    """(uid, gid, groups) of the calling process (the client the caller exec'd, so its
    own credentials, `sg` or `setpriv --regid` included); the dispatcher's own (the
    same user: the dispatcher serves only its uid) if that process cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1]),
                [int(g) for g in fields["Groups"].split()])
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return os.getuid(), os.getgid(), os.getgroups()


def ulimits(rlimits):
    return [{"Name": RLIMIT_NAMES[res], "Soft": as_limit(soft), "Hard": as_limit(hard)}
            for res, soft, hard in rlimits if res in RLIMIT_NAMES]


def as_limit(value):
    return -1 if value == resource.RLIM_INFINITY else int(value)


def stdin_source(job):
    """Our descriptor to pump into the container, or None for no stdin (/dev/null)."""
    fd = job.fds.get(0)
    if job.stdin == "none" or fd is None:
        return None
    st = os.fstat(fd)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat("/dev/null").st_rdev:
        return None
    if job.stdin == "auto" and stat.S_ISREG(st.st_mode):
        try:    # from the caller's offset, which stays where it is
            again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            os.lseek(again, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
            return again
        except OSError:
            pass
    return os.dup(fd)


# -- small things --

def signal_of(status):
    """The signal the engine's status 128+N stands for, or None. With an init process
    in front, a tool killed by signal N ends its container with 128+N, and a tool that
    itself exits 128+N (bash after a Ctrl-C exits 130) looks the same: both read as the
    signal, which is what a shell's $? would say of either."""
    signum = status - 128
    return signum if 0 < signum < signal.NSIG else None


def named_images(rules):
    """The images the whitelist's rules name (rules: a Whitelist, or None)."""
    return sorted({r.image for r in rules.rules if r.image}) if rules else []


def dispatcher_alive(labels):
    """Whether the dispatcher a container's labels name still runs (same start time)."""
    try:
        pid = int(labels.get(LABEL_DISPATCHER))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"arvwrap.dispatcher" not in f.read():
                return False
    except (TypeError, ValueError, OSError):
        return False
    started = labels.get(LABEL_STARTED)
    return started is None or started == str(start_time(pid))


def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def cancelled_before_start(job):
    signum = job.first_signal()
    if job.cancel_reason:
        return Outcome("cancelled", reason=job.cancel_reason, caller_signal=signal.SIGTERM,
                       message=f"job {job.id} ({job.tool}) cancelled: {job.cancel_reason}")
    return Outcome("cancelled", reason=f"signal {signum} before the container started",
                   caller_signal=signum)


def engine_trouble(error, started=False):
    """The engine failed us: before the tool ran, on_backend_error may run it locally."""
    text = f"docker: {one_line(error)}"
    return Outcome("failed", reason=text, message=text, run_locally=not started
                   and not hasattr(error, "status_code"))


def one_line(error):
    text = getattr(error, "explanation", None) or str(error)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(str(text).split())


class NotText(Exception):
    """A part of the call that the engine's JSON API cannot carry byte for byte."""


def text(value, why):
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise NotText(why) from None


def drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass

