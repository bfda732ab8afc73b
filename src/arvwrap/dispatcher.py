"""The dispatcher: one long-lived process per user and state dir that serves every
redirected call on this machine.

The C client connects, hands over the call (docs/internals.md, section 4) with its
own descriptors, and waits. The dispatcher owns all policy: it re-reads the rules,
builds the job, records it, runs it through a backend, and answers with the exit
status or the signal the caller must die of. A thread serves each connection; a
second thread per connection reads the caller's forwarded signals and notices
when the caller dies (its socket closes), which cancels the job.

It is started on first use by the client and leaves when idle. SIGTERM, SIGINT or
SIGHUP stop it cleanly: no new calls, every job cancelled (so no Slurm job outlives
it) and its caller answered, the socket removed.
"""
import argparse
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from arvwrap import backends, paths, protocol, store, whitelist
from arvwrap.jobspec import Job, Outcome, final_fields, job_environment

log = logging.getLogger("arvwrap.dispatcher")
CANCEL_MAGIC = b"AWC1"   # `arv-wrap cancel`: AWC1 + job id + newline; answer "ok" or "unknown"
STOP_GRACE = 30.0       # s a stopping dispatcher waits for its cancelled jobs to end


class RuleCache:
    """Whitelists re-read only when one of their files changed."""

    def __init__(self):
        self._key = None
        self._value = None
        self._lock = threading.Lock()

    def get(self, files):
        key = tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
        with self._lock:
            if key != self._key:
                self._value, self._key = whitelist.load(list(files)), key
            return self._value


class Dispatcher:
    def __init__(self, sock_path, state_dir, env=os.environ):
        self.sock_path = sock_path
        self.state_dir = state_dir
        self.store = store.Store(state_dir)
        self.rules = RuleCache()
        self.idle_timeout = float(env.get("ARV_WRAP_IDLE_TIMEOUT") or 120)
        self.backend_config = backends.config_from_env(env)
        self.backends = {}
        self.jobs = {}             # id -> Job, while it is queued or running
        self.active = 0            # connections being served
        self.stop_signal = None    # the signal that asked the dispatcher to stop
        self.stopping = None       # then the reason its jobs are cancelled
        self.last_activity = time.monotonic()
        self.lock = threading.Lock()

    # -- serving --
    def serve(self, listener):
        self.sock_ino = os.stat(self.sock_path).st_ino
        listener.setblocking(False)
        wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        poller = select.poll()
        for fd in (listener.fileno(), wake_r):
            poller.register(fd, select.POLLIN)
        while self.stop_signal is None:
            if not poller.poll(1000):
                if self._idle():
                    self._leave(listener)
                    return
                continue
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            conn.setblocking(True)
            self._start(conn)
        self._stop(listener)

    def on_signal(self, signum, _frame=None):
        """SIGTERM, SIGINT, SIGHUP: only note it; the serving loop stops (the handler
        may interrupt the main thread anywhere, even holding self.lock)."""
        self.stop_signal = signum
        try:
            os.write(self.wake_w, b"x")
        except (AttributeError, OSError):
            pass

    def _start(self, conn):
        with self.lock:
            self.active += 1
            self.last_activity = time.monotonic()
        threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _idle(self):
        with self.lock:
            return (self.active == 0 and not self.jobs
                    and time.monotonic() - self.last_activity > self.idle_timeout)

    def _unlink(self):
        """Remove the socket if it is still ours: new clients start a new dispatcher."""
        try:
            if os.stat(self.sock_path).st_ino == self.sock_ino:
                os.unlink(self.sock_path)
        except OSError:
            pass

    def _serve_backlog(self, listener):
        """Take the calls that connected before the socket was unlinked."""
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, OSError):
                return
            conn.setblocking(True)
            self._start(conn)

    def _leave(self, listener):
        """Unlink first, then serve what already queued."""
        self._unlink()
        self._serve_backlog(listener)
        while self.active:
            time.sleep(0.05)
        listener.close()

    def _stop(self, listener):
        """Cancel every job (queued ones too), wait (bounded) until every caller has
        its answer, and leave."""
        reason = f"the arv-wrap dispatcher was stopped ({signal.Signals(self.stop_signal).name})"
        log.info("%s", reason)
        self._unlink()
        with self.lock:
            self.stopping = reason
            running = list(self.jobs.values())
        for job in running:
            job.cancel(reason)
        self._serve_backlog(listener)
        deadline = time.monotonic() + STOP_GRACE
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        listener.close()

    def _serve_conn(self, conn):
        try:
            if protocol.peer_uid(conn) != os.getuid():
                log.warning("refused a connection from another uid")
                return
            if conn.recv(4, socket.MSG_PEEK) == CANCEL_MAGIC:
                self._serve_cancel(conn)
                return
            try:
                request = protocol.read_request(conn)
            except protocol.ProtocolError as e:
                protocol.send_line(conn, f"fail bad request: {e}")
                return
            self._serve_request(conn, request)
        except Exception:
            log.exception("error serving a connection")
            protocol.send_line(conn, "fail internal error in the dispatcher (see dispatcher.log)")
        finally:
            conn.close()
            with self.lock:
                self.active -= 1
                self.last_activity = time.monotonic()

    def _serve_cancel(self, conn):
        data = b""
        while not data.endswith(b"\n") and len(data) < 256:
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
        job_id = data[len(CANCEL_MAGIC):].strip().decode(errors="replace")
        with self.lock:
            job = self.jobs.get(job_id)
        if job:
            job.cancel("cancelled by arv-wrap cancel")
        protocol.send_line(conn, "ok" if job else "unknown")

    def _serve_request(self, conn, request):
        try:
            job, warning = self.build_job(request)
        except BaseException:
            request.close()
            raise
        if warning:
            protocol.send_line(conn, f"warn {warning}")
        if job is None:
            request.close()
            protocol.send_line(conn, "local")
            return
        try:
            outcome = self.run_job(conn, job)
        finally:
            job.close()
        if outcome.state == "exited" and outcome.message:
            protocol.send_line(conn, f"warn {outcome.message}")
        protocol.send_line(conn, reply_for(outcome))

    # -- policy --
    def build_job(self, request):
        """(Job, warning) for a request, or (None, warning) to run it locally."""
        env = request.env_dict()
        files = [f for f in os.fsdecode(env.get(b"ARV_WRAP_WHITELIST", b"")).split(":") if f]
        try:
            rules = self.rules.get(files)
        except (OSError, whitelist.WhitelistError) as e:
            return None, f"cannot read the rules ({e}); running {os.fsdecode(request.path)} locally"
        name = os.path.basename(request.path)
        rule = rules.match(request.argv, name, request.path)
        if rule is None:
            return None, None
        cpus, memory, time_limit, notes = whitelist.resources(rule, request.argv)
        job_id = store.new_id()
        run = os.fsdecode(env.get(b"ARV_WRAP_RUN", b"")) or None
        parent = os.fsdecode(env.get(b"ARV_WRAP_JOB", b"")) or run
        backend = os.fsdecode(env.get(b"ARV_WRAP_BACKEND", b"")) or rule.backend or "local"
        job = Job(id=job_id, run=run, parent=parent, argv=request.argv, path=request.path,
                  cwd=request.cwd, env=job_environment(env, job_id, rule.nested, rule),
                  umask=request.umask, rlimits=request.rlimits, fds=request.fds,
                  cwd_fd=request.cwd_fd, cpus=cpus, memory=memory, time_limit=time_limit,
                  stdin=rule.stdin, nested=rule.nested, backend=backend,
                  on_backend_error=rule.on_backend_error, on_oversize=rule.on_oversize,
                  rule=rule, slurm=rule.slurm or {}, notes=list(notes))
        return job, None

    def backend(self, name):
        with self.lock:
            if name not in self.backends:
                self.backends[name] = backends.load(name, self.backend_config.get(name, {}))
            return self.backends[name]

    def run_job(self, conn, job):
        self.store.insert(job.record())
        with self.lock:
            self.jobs[job.id] = job
            if self.stopping:
                job.cancel(self.stopping)
        threading.Thread(target=watch_caller, args=(conn, job), daemon=True).start()
        try:
            try:
                outcome = self.run_on(self.backend(job.backend), job)
            except backends.BackendError as e:
                outcome = Outcome("failed", reason=str(e), message=str(e), run_locally=True)
            if self.falls_back(job, outcome):
                job.backend = "local"
                outcome = self.run_on(self.backend("local"), job)
        finally:
            with self.lock:
                self.jobs.pop(job.id, None)
        reasons = [*job.notes, outcome.reason] if outcome.reason else job.notes
        self.store.update(job.id, reason="; ".join(r for r in reasons if r) or None,
                          backend=job.backend, cpus=job.cpus, memory=job.memory,
                          **final_fields(outcome))
        return outcome

    def run_on(self, backend, job):
        def started(backend_id, state="running"):
            # a backend may give its id while the job still waits there (state "queued")
            fields = {"started": store.now()} if state == "running" else {}
            self.store.update(job.id, state=state, backend_id=backend_id, **fields)
        try:
            return backend.run(job, started)
        except Exception as e:
            log.exception("backend %s failed on job %s", job.backend, job.id)
            return Outcome("failed", reason=f"backend error: {e}", run_locally=True,
                           message=f"the {job.backend} backend failed: {e}")

    @staticmethod
    def falls_back(job, outcome):
        """Whether a remote backend's outcome sends the job to the local backend."""
        if job.backend == "local":
            return False
        if outcome.use_local_backend:
            job.notes.append(f"ran on the local backend: {outcome.reason}")
            return True
        if outcome.run_locally and job.on_backend_error == "local":
            job.notes.append(f"{outcome.reason}; ran on the local backend (on_backend_error: local)")
            return True
        if outcome.run_locally:    # the backend failed and the rule says fail
            outcome.run_locally = False
            outcome.message = outcome.message or outcome.reason
        return False


def watch_caller(conn, job):
    """Forward the caller's signals to the job; cancel it if the caller goes away."""
    for signum in protocol.ControlReader(conn):
        job.signal(signum)
    job.cancel("the redirected call went away")


def reply_for(outcome):
    """The final line for the client (docs/internals.md, section 4)."""
    if outcome.run_locally:
        return "local"
    if outcome.state == "exited":
        return f"exit {outcome.exit_status}"
    if outcome.state == "signaled":
        return f"signal {outcome.signal}" + (f" {outcome.message}" if outcome.message else "")
    if outcome.state == "cancelled":
        text = f" {outcome.message}" if outcome.message else ""
        return f"signal {outcome.caller_signal or 15}{text}"
    return f"fail {outcome.message or outcome.reason or 'the job could not run'}"


def listen(sock_path):
    """Bind the socket; None if another dispatcher already listens there."""
    paths.private_dir(os.path.dirname(sock_path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(sock_path)
    except OSError:
        listener.close()
        return None
    listener.listen(512)
    return listener


def main(argv=None):
    parser = argparse.ArgumentParser(prog="arvwrap.dispatcher")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args(argv)
    os.umask(0o077)
    state = paths.private_dir(args.state_dir)
    logging.basicConfig(filename=os.path.join(state, "dispatcher.log"), level=logging.INFO,
                        format="%(asctime)s %(process)d %(levelname)s %(message)s")
    listener = listen(args.socket)
    if listener is None:
        return 0
    log.info("dispatcher up on %s", args.socket)
    dispatcher = Dispatcher(args.socket, state)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, dispatcher.on_signal)
    dispatcher.serve(listener)
    log.info("dispatcher leaving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
