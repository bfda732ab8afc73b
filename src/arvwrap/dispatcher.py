"""The dispatcher: one long-lived process per user and state dir that serves every
redirected call on this machine.

The C client connects, hands over the call (docs/internals.md, section 4) with its
own descriptors, and waits. The dispatcher owns all policy: it re-reads the rules,
builds the job, records it, and decides where and when it runs. A local job is
started by the client itself, as the caller's own child, once the local scheduler
admits it ("run"); the dispatcher steers it through a pidfd (time limit, cancel)
and records how it ended when the client reports it. A job on another backend
runs in a thread of its own (backend.run blocks), and the client's forwarded
signals and its going away reach it through the Job.

One thread serves every connection: an epoll loop (selectors) over the listener
and the connections, with timers for time limits, kill grace and pipe rechecks.
No local job is ever a child of the dispatcher, so nothing a job does can stop it.

It is started on first use by the client and leaves when idle. SIGTERM, SIGINT or
SIGHUP stop it cleanly: no new calls, every job cancelled (so no Slurm job outlives
it) and its caller answered, the socket removed.
"""
import argparse
import heapq
import itertools
import logging
import os
import queue
import resource
import selectors
import signal
import socket
import sys
import threading
import time

from arvwrap import backends, paths, protocol, store, whitelist
from arvwrap.backends import local
from arvwrap.jobspec import Job, Outcome, final_fields, job_environment

log = logging.getLogger("arvwrap.dispatcher")
STOP_GRACE = 30.0       # s a stopping dispatcher waits for its cancelled jobs to end
REQUEST_TIMEOUT = 30.0  # s a connection may take to send its whole request
TICK = 1.0              # s between idle and stale-request checks


class RuleCache:
    """Whitelists re-read only when one of their files changed."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, files):
        key = tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
        if key != self._key:
            self._value, self._key = whitelist.load(list(files)), key
        return self._value


class Call:
    """One connection, from its request to its final reply."""

    def __init__(self, conn):
        self.conn = conn
        self.incoming = protocol.Incoming(conn)
        self.lines = protocol.ControlReader(conn)
        self.created = time.monotonic()
        self.deadline = self.created + REQUEST_TIMEOUT
        self.job = None
        self.claim = None        # local: what it holds or waits for
        self.state = "reading"   # reading, queued, starting, running, remote
        self.pid = None          # local: the tool, as the client reported it
        self.pidfd = None
        self.admitted = None     # monotonic time the local scheduler let it start
        self.why_killed = None   # what arv-wrap stopped it for
        self.kill_timer = None


class Dispatcher:
    def __init__(self, sock_path, state_dir, env=os.environ):
        self.sock_path = sock_path
        self.state_dir = state_dir
        self.store = store.Store(state_dir)
        self.rules = RuleCache()
        self.idle_timeout = float(env.get("ARV_WRAP_IDLE_TIMEOUT") or 120)
        self.backend_config = backends.config_from_env(env)
        self.backends = {}
        self.calls = set()
        self.stop_signal = None    # the signal that asked the dispatcher to stop
        self.stopping = None       # then the reason its jobs are cancelled
        self.leaving = False       # idle: the socket is gone, serving what remains
        self.last_activity = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.timers = []           # heap of (when, seq, callback)
        self._seq = itertools.count()
        self.posted = queue.SimpleQueue()   # callbacks from backend threads
        self.backend_lock = threading.Lock()
        self.recheck_due = False

    # -- the loop --
    def serve(self, listener):
        self.sock_ino = os.stat(self.sock_path).st_ino
        self.listener = listener
        listener.setblocking(False)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._drain_wake)
        self.after(TICK, self._tick)
        while True:
            if self.stop_signal is not None and self.stopping is None:
                self._begin_stop()
            if self._finished():
                break
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else TICK
            for key, _ in self.selector.select(timeout):
                key.data(key.fileobj)
            self._run_timers()
            while not self.posted.empty():
                self.posted.get()()
        listener.close()

    def _finished(self):
        if self.stopping is not None:
            return not self.calls or time.monotonic() > self.stop_deadline
        if self.leaving and not self.calls:
            self._accept(self.listener)   # what connected before the socket went
        return self.leaving and not self.calls

    def on_signal(self, signum, _frame=None):
        """SIGTERM, SIGINT, SIGHUP: only note it; the loop stops (the handler may
        interrupt the loop anywhere)."""
        self.stop_signal = signum
        self.wake()

    def wake(self):
        try:
            os.write(self.wake_w, b"x")
        except (AttributeError, OSError):
            pass

    def post(self, callback):
        """Run callback on the loop (from a backend thread)."""
        self.posted.put(callback)
        self.wake()

    def _drain_wake(self, fd):
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def after(self, seconds, callback):
        entry = [time.monotonic() + seconds, next(self._seq), callback]
        heapq.heappush(self.timers, entry)
        return entry

    @staticmethod
    def cancel_timer(entry):
        if entry:
            entry[2] = None

    def _run_timers(self):
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback = heapq.heappop(self.timers)
            if callback:
                callback()

    def _tick(self):
        """Drop connections that never sent a whole request; leave when idle."""
        now = time.monotonic()
        for call in [c for c in self.calls if c.state == "reading" and now > c.deadline]:
            log.warning("closed a connection that sent no whole request in %gs", REQUEST_TIMEOUT)
            self._close(call)
        if (not self.leaving and self.stopping is None and not self.calls
                and now - self.last_activity > self.idle_timeout):
            log.info("idle for %gs: leaving", self.idle_timeout)
            self.leaving = True
            self._unlink()
        self.after(TICK, self._tick)

    def _unlink(self):
        """Remove the socket if it is still ours: new clients start a new dispatcher.
        The connections already queued on the listener are still accepted."""
        try:
            if os.stat(self.sock_path).st_ino == self.sock_ino:
                os.unlink(self.sock_path)
        except OSError:
            pass

    # -- connections --
    def _accept(self, listener):
        for _ in range(64):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # out of descriptors: wait for some to close
                log.warning("cannot accept a connection: %s", e)
                return
            if protocol.peer_uid(conn) != os.getuid():
                log.warning("refused a connection from uid %d", protocol.peer_uid(conn))
                conn.close()
                continue
            conn.setblocking(False)
            call = Call(conn)
            self.calls.add(call)
            self.last_activity = time.monotonic()
            self.selector.register(conn, selectors.EVENT_READ, lambda _c, call=call: self._readable(call))

    def _readable(self, call):
        if call.state == "reading":
            try:
                message = call.incoming.feed()
            except protocol.ProtocolError as e:
                log.warning("bad request: %s", e)
                self._close(call)
                return
            if message is not None:
                self._handle(call, *message)
            return
        for message in call.lines.read():
            self._client_message(call, message)
            if call.conn is None:
                return
        if call.lines.eof:
            self._caller_gone(call)

    def _handle(self, call, kind, body):
        if kind == "cancel":
            found = self.cancel(body, "cancelled by arv-wrap cancel")
            self._finish(call, "ok" if found else "unknown")
            return
        try:
            self._serve_request(call, body)
        except Exception:
            log.exception("error serving a call")
            if call.claim:
                self._release(call)
            self._finish(call, "fail internal error in the dispatcher (see dispatcher.log)")

    def _send(self, call, data):
        """Replies are short: a blocking send of the whole (the client reads at once)."""
        try:
            call.conn.setblocking(True)
            call.conn.settimeout(5)
            call.conn.sendall(data)
            return True
        except OSError:
            return False
        finally:
            if call.conn is not None:
                call.conn.setblocking(False)

    def _finish(self, call, line):
        """The final reply, then the connection closes."""
        if call.conn is not None:
            self._send(call, protocol.encode_line(line))
        self._close(call)

    def _close(self, call):
        if call.conn is not None:
            self.selector.unregister(call.conn)
            call.conn.close()
            call.conn = None
        if call.job is not None:
            call.job.close()
        if call.pidfd is not None:
            os.close(call.pidfd)
            call.pidfd = None
        self.cancel_timer(call.kill_timer)
        self.calls.discard(call)
        self.last_activity = time.monotonic()

    # -- requests --
    def _serve_request(self, call, request):
        call.deadline = None
        call.state = "building"
        try:
            job, warning = self.build_job(request)
        except BaseException:
            request.close()
            raise
        if warning:
            self._send(call, protocol.encode_line(f"warn {warning}"))
        if job is None:
            request.close()
            self._finish(call, "local")
            return
        call.job = job
        try:
            self.store.insert({**job.record(), "dispatcher": os.getpid()})
        except Exception as e:
            log.error("cannot record job %s: %s", job.id, e)
            self._finish(call, f"fail cannot record the job in {self.state_dir}: {e}")
            return
        if self.stopping:
            job.cancel(self.stopping)
        if job.backend == "local":
            self._submit_local(call)
        else:
            self._start_remote(call)

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
        job.client_pid = request.pid
        return job, None

    def backend(self, name):
        with self.backend_lock:
            if name not in self.backends:
                self.backends[name] = backends.load(name, self.backend_config.get(name, {}))
            return self.backends[name]

    def _end(self, call, outcome, **fields):
        """Record how the job ended and give the caller its final reply."""
        job = call.job
        reasons = [*job.notes, outcome.reason] if outcome.reason else job.notes
        try:
            self.store.update(job.id, reason="; ".join(r for r in reasons if r) or None,
                              backend=job.backend, cpus=job.cpus, memory=job.memory,
                              **final_fields(outcome), **fields)
        except Exception as e:
            log.error("cannot record the end of job %s: %s", job.id, e)
        if outcome.state == "exited" and outcome.message:
            self._send(call, protocol.encode_line(f"warn {outcome.message}"))
        self._finish(call, protocol.final_reply(outcome))

    # -- local jobs: the client starts them --
    def _submit_local(self, call):
        job, scheduler = call.job, self.backend("local").scheduler
        job.backend = "local"
        refused = self.backend("local").fit(job)
        if refused:
            self._end(call, refused)
            return
        if job.cancel_reason:
            self._end(call, local.cancelled_while_queued(job))
            return
        call.claim = local.Claim(job, owner=call, exclude_pid=job.client_pid)
        job.close()                 # the client keeps the caller's descriptors itself
        if scheduler.submit(call.claim):
            self._launch(call)
        else:
            call.state = "queued"
            self._schedule_recheck()

    def _launch(self, call):
        """Tell the client to start the tool: it was admitted."""
        job = call.job
        call.state = "starting"
        call.admitted = time.monotonic()
        if not self._send(call, protocol.run_message(job.env, job.stdin == "none")):
            self._caller_gone(call)

    def _client_message(self, call, message):
        if isinstance(message, int):                 # a forwarded signal
            if call.state == "queued":
                self._withdraw(call)
                self._end(call, local.cancelled_while_queued(call.job, message))
            elif call.state == "remote":
                call.job.signal(message)
        elif isinstance(message, protocol.Done):
            self._local_done(call, message)
        elif message[0] == "pid" and call.state == "starting":
            self._local_started(call, message[1])
        elif message[0] == "nostart" and call.state == "starting":
            self._release(call)
            self._end(call, Outcome("failed", reason=f"cannot start: {os.strerror(message[1])}"))

    def _local_started(self, call, pid):
        call.state, call.pid = "running", pid
        try:
            call.pidfd = os.pidfd_open(pid)
        except OSError:
            call.pidfd = None        # it has already ended: its "done" follows
        job = call.job
        if job.time_limit:
            call.kill_timer = self.after(job.time_limit, lambda: self._kill_local(
                call, f"{job.tool} exceeded its time limit of {job.time_limit}s"))
        if job.cancel_reason:
            self._kill_local(call, job.cancel_reason)
        try:
            self.store.update(job.id, state="running", backend_id=str(pid), started=store.now(),
                              queued_seconds=round(call.admitted - call.created, 3))
        except Exception as e:
            log.error("cannot record the start of job %s: %s", job.id, e)

    def _local_done(self, call, done):
        if call.state not in ("starting", "running"):
            return
        self._release(call)
        status = os.waitstatus_to_exitcode(done.status)
        outcome = local.outcome_of(status, call.job, call.why_killed)
        self._end(call, outcome, cpu_seconds=round(done.cpu_seconds, 3), max_rss=done.max_rss)

    def _kill_local(self, call, why):
        """SIGTERM the tool and everything below it; SIGKILL after a grace."""
        if call.state != "running" or call.why_killed:
            return
        call.why_killed = why
        self.cancel_timer(call.kill_timer)
        if call.pidfd is None:
            return
        local.signal_tree(call.pidfd, call.pid, signal.SIGTERM)
        call.kill_timer = self.after(local.KILL_GRACE, lambda: call.pidfd is not None and (
            local.signal_tree(call.pidfd, call.pid, signal.SIGKILL)))

    def _release(self, call):
        """Give back what a local call held, and start the jobs that now fit."""
        claim, call.claim = call.claim, None
        if claim is None:
            return
        if claim in self.backend("local").scheduler.running:
            for admitted in self.backend("local").scheduler.release(claim):
                self._launch(admitted.owner)
        else:
            self._withdraw_claim(claim)

    def _withdraw(self, call):
        claim, call.claim = call.claim, None
        if claim is not None:
            self._withdraw_claim(claim)

    def _withdraw_claim(self, claim):
        for admitted in self.backend("local").scheduler.withdraw(claim):
            self._launch(admitted.owner)

    def _schedule_recheck(self):
        if not self.recheck_due and self.backend("local").scheduler.needs_recheck():
            self.recheck_due = True
            self.after(local.RECHECK, self._recheck)

    def _recheck(self):
        self.recheck_due = False
        scheduler = self.backend("local").scheduler
        if scheduler.needs_recheck():
            for admitted in scheduler.recheck():
                self._launch(admitted.owner)
        self._schedule_recheck()

    def _caller_gone(self, call):
        """The client closed or died (its tool dies with it: PR_SET_PDEATHSIG)."""
        job = call.job
        if job is None or call.state in ("reading", "building"):
            self._close(call)
            return
        reason = "the redirected call went away"
        if call.state == "remote":
            job.cancel(reason)
            self.selector.unregister(call.conn)   # its thread answers; nobody will read
            call.conn.close()
            call.conn = None
            return
        self._release(call)
        job.cancel(reason)
        self._end(call, Outcome("cancelled", reason=reason, caller_signal=signal.SIGKILL))

    def cancel(self, job_id, reason):
        """Cancel a job this dispatcher holds; False if it holds none by that id."""
        for call in list(self.calls):
            if call.job is not None and call.job.id == job_id:
                self._cancel_call(call, reason)
                return True
        return False

    def _cancel_call(self, call, reason):
        job = call.job
        job.cancel(reason)
        if call.state == "queued":
            self._withdraw(call)
            self._end(call, local.cancelled_while_queued(job))
        elif call.state == "running":
            self._kill_local(call, reason)
        # "starting": killed when its pid arrives; "remote": its backend sees the cancel

    # -- other backends: a thread per job --
    def _start_remote(self, call):
        call.state = "remote"
        threading.Thread(target=self._run_remote, args=(call,), daemon=True).start()

    def _run_remote(self, call):
        job = call.job
        try:
            outcome = self.run_on(self.backend(job.backend), job)
        except backends.BackendError as e:
            outcome = Outcome("failed", reason=str(e), message=str(e), run_locally=True)
        self.post(lambda: self._remote_done(call, outcome))

    def _remote_done(self, call, outcome):
        if self.falls_back(call.job, outcome) and call.conn is not None:
            call.job.backend = "local"
            self._submit_local(call)
            return
        if call.conn is None:          # the caller went away while it ran
            self.store_end(call.job, outcome)
            self._close(call)
            return
        self._end(call, outcome)

    def store_end(self, job, outcome):
        reasons = [*job.notes, outcome.reason] if outcome.reason else job.notes
        try:
            self.store.update(job.id, reason="; ".join(r for r in reasons if r) or None,
                              backend=job.backend, **final_fields(outcome))
        except Exception as e:
            log.error("cannot record the end of job %s: %s", job.id, e)

    def run_on(self, backend, job):
        def started(backend_id, state="running"):
            # a backend may give its id while the job still waits there (state "queued")
            fields = {"started": store.now()} if state == "running" else {}
            self.store.update(job.id, state=state, backend_id=backend_id, **fields)
        try:
            return backend.run(job, started)
        except Exception as e:
            log.exception("backend %s failed on job %s", job.backend, job.id)
            return Outcome("failed", reason=f"backend error: {e}",
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

    # -- stopping --
    def _begin_stop(self):
        """Cancel every job (queued ones too, and calls still in the backlog), then
        let the loop run until every caller has its answer (bounded)."""
        reason = f"the arv-wrap dispatcher was stopped ({signal.Signals(self.stop_signal).name})"
        log.info("%s", reason)
        self.stopping = reason
        self.stop_deadline = time.monotonic() + STOP_GRACE
        self._unlink()
        self._accept(self.listener)
        for call in list(self.calls):
            if call.job is not None:
                self._cancel_call(call, reason)


def is_dispatcher(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"arvwrap.dispatcher" in f.read()
    except OSError:
        return False


def close_orphans(dispatcher):
    """Jobs a killed dispatcher held never got their end recorded: say so."""
    for job_id in dispatcher.store.orphans(is_dispatcher):
        dispatcher.store.update(
            job_id, state="failed", ended=store.now(),
            reason="its dispatcher died while it held the job (a local job that was running "
                   "finished, and its caller got its own status, which was not recorded)")
        log.warning("job %s: its dispatcher died; recorded as failed", job_id)


def listen(sock_path):
    """Bind the socket; None if another dispatcher already listens there."""
    paths.private_dir(os.path.dirname(sock_path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(sock_path)
    except OSError:
        listener.close()
        return None
    listener.listen(4096)
    return listener


def raise_fd_limit():
    """Each call in flight holds a connection and a pidfd: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start(args):
    """Set up: the state dir, the log, the store, the socket. Raises on failure."""
    os.umask(0o077)
    try:
        state = paths.private_dir(args.state_dir)
        logging.basicConfig(filename=os.path.join(state, "dispatcher.log"), level=logging.INFO,
                            format="%(asctime)s %(process)d %(levelname)s %(message)s")
        dispatcher = Dispatcher(args.socket, state)
    except (OSError, store.sqlite3.Error) as e:
        raise SystemExit(f"cannot use the state dir {args.state_dir}: "
                         f"{getattr(e, 'strerror', None) or e}")
    raise_fd_limit()
    return dispatcher


def report(fd, text):
    """Tell the client that started us why we cannot serve (one line), or that we listen."""
    if fd is None:
        return
    try:
        if text:
            os.write(fd, os.fsencode(text.replace("\n", " ")) + b"\n")
        os.close(fd)
    except OSError:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(prog="arvwrap.dispatcher")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--report-fd", type=int)
    args = parser.parse_args(argv)
    try:
        dispatcher = start(args)
        listener = listen(args.socket)
    except SystemExit as e:
        report(args.report_fd, f"the dispatcher cannot start: {e}")
        return 1
    except Exception as e:
        report(args.report_fd, f"the dispatcher cannot start: {e}")
        return 1
    report(args.report_fd, None)
    if listener is None:
        return 0
    log.info("dispatcher up on %s", args.socket)
    close_orphans(dispatcher)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, dispatcher.on_signal)
    dispatcher.serve(listener)
    log.info("dispatcher leaving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
