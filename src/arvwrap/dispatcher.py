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

One thread serves every connection: an epoll loop over the listener and the
connections, with timers for time limits, kill grace and pipe rechecks.
No local job is ever a child of the dispatcher, so nothing a job does can stop it.

It is started on first use by the client and leaves when idle. SIGTERM, SIGINT or
SIGHUP stop it cleanly: no new calls, every job cancelled (so no Slurm job outlives
it) and its caller answered, the socket removed.
"""
import argparse
import functools
import heapq
import itertools
import logging
import os
import queue
import resource
import select
import signal
import socket
import sys
import threading
import time

from arvwrap import backends, paths, protocol, redact, runs, store, whitelist
from arvwrap.backends import local
from arvwrap.envs import Envs
from arvwrap.jobspec import Job, final_fields
from arvwrap.local_jobs import LocalJobs
from arvwrap.remote_jobs import RemoteJobs
from arvwrap.reuse_jobs import ReuseJobs, reuse_enabled

log = logging.getLogger("arvwrap.dispatcher")
STOP_GRACE = 30.0       # s a stopping dispatcher waits for its cancelled jobs to end
REQUEST_TIMEOUT = 30.0  # s a connection may take to send its whole request
TICK = 1.0              # s between idle and stale-request checks
CLEANUP_GRACE = 600.0   # s an idle dispatcher stays for jobs a backend must still cancel
RUNS_CHECK = 5.0        # s between checks for `arv-wrap env` runs whose shell is gone
ROUND_PASSES = 4        # looks for more ready connections before a round commits
# the dispatcher's log never shows a secret value of a call it served (nor NAME=VALUE
# of a secret NAME): every job's secrets join this one
LOG_REDACTOR = redact.Redactor(redact.patterns_from())


class RedactingFilter(logging.Filter):
    def filter(self, record):
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = record.exc_text = None
        record.msg, record.args = LOG_REDACTOR.text(text), ()
        return True


class RuleCache:
    """Whitelists re-read only when one of their files changed. The files are looked
    at once per loop round (new_round), not once per call: a round serves many."""
    KEEP = 32          # sets of whitelists kept loaded (pipelines with their own)

    def __init__(self):
        self._loaded = {}      # files -> (their stat key when loaded, the Whitelist)
        self._seen = {}        # files -> their stat key, this round

    def new_round(self):
        self._seen.clear()

    def get(self, files):
        files = tuple(files)
        key = self._seen.get(files)
        if key is None:
            key = self._seen[files] = tuple((f, st.st_mtime_ns, st.st_size)
                                            for f in files for st in [os.stat(f)])
        loaded = self._loaded.get(files)
        if loaded is None or loaded[0] != key:
            if len(self._loaded) >= self.KEEP:
                self._loaded.pop(next(iter(self._loaded)))
            loaded = self._loaded[files] = (key, whitelist.load(list(files)))
        return loaded[1]


class Poller:
    """The loop's epoll: one callback per descriptor, called when it is readable.
    (selectors builds a key object per registration and looks each event up.)"""

    def __init__(self):
        self._epoll = select.epoll()
        self._callbacks = {}

    def register(self, fd, callback):
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def unregister(self, fd):
        del self._callbacks[fd]
        self._epoll.unregister(fd)

    def ready(self, timeout):
        """The callbacks of the descriptors readable within timeout seconds, taken
        now: one that an earlier callback unregisters still runs, as with selectors."""
        return [self._callbacks[fd] for fd, _ in self._epoll.poll(timeout)
                if fd in self._callbacks]


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
        self.state = "reading"   # reading, queued, starting, running, stating, remote
        self.pid = None          # local: the tool, as the client reported it
        self.pidfd = None
        self.admitted = None     # monotonic time the local scheduler let it start
        self.why_killed = None   # what arv-wrap stopped it for
        self.kill_timer = None
        self.pid_timer = None
        self.recorded = False    # its record is written (or waits for the round's commit)
        self.unrecorded = False  # that commit failed: it ends, and never starts
        self.capture = None      # job reuse: its streams and outputs, kept as it runs
        self.tool_status = None  # local: the wait status the client reported
        self.spooled = None      # job reuse: its stdin, read while it waits for the same work
        self.state_unknown = False  # the caller's process state is the client's to send


class Dispatcher(ReuseJobs, LocalJobs, RemoteJobs):
    def __init__(self, sock_path, state_dir, env=os.environ):
        self.sock_path = sock_path
        self.uid, self.pid = os.getuid(), os.getpid()
        self.state_dir = state_dir
        self.store = store.Store(state_dir, checkpoint_aside=True)
        self.rules = RuleCache()
        self.envs = Envs()
        self.idle_timeout = float(env.get("ARV_WRAP_IDLE_TIMEOUT") or 120)
        self.env = env
        # built now: bad ARV_WRAP_LOCAL_* settings stop the start, with one line
        self.backends = {"local": backends.load("local", env, state_dir)}
        self.calls = set()
        self.by_job = {}           # job id -> its Call, while the dispatcher holds it
        self.stop_signal = None    # the signal that asked the dispatcher to stop
        self.stopping = None       # then the reason its jobs are cancelled
        self.leaving = False       # idle: the socket is gone, serving what remains
        self.last_activity = time.monotonic()
        self.poller = Poller()
        self.timers = []           # heap of (when, seq, callback)
        self._seq = itertools.count()
        self.posted = queue.SimpleQueue()   # callbacks from backend threads
        self.after_commit = []   # what waits for the round's records (replies, starts)
        self.failed_records = []  # (call, error): its record failed at the round's commit
        self._cache = self._workers = None   # job reuse, made on first use
        self.running_keys = {}    # reuse key -> [calls waiting for the job running it]
        self.key_runners = {}     # reuse key -> id of that job
        self.backend_lock = threading.Lock()
        self.recheck_due = False
        self.next_runs_check = 0.0
        self.log_redactor = LOG_REDACTOR

    # -- the loop --
    def serve(self, listener):
        self.sock_ino = os.stat(self.sock_path).st_ino
        self.listener = listener
        listener.setblocking(False)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(listener.fileno(), lambda: self._accept(listener))
        self.poller.register(self.wake_r, lambda: self._drain_wake(self.wake_r))
        self.after(TICK, self._tick)
        while True:
            if self.stop_signal is not None and self.stopping is None:
                self._begin_stop()
            if self._finished():
                break
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else TICK
            ready = self.poller.ready(timeout)
            self.rules.new_round()
            self.store.begin_batch()
            try:
                self._serve_events(ready)
                self._run_timers()
                while not self.posted.empty():
                    self.posted.get()()
            finally:
                self._end_round()
        listener.close()

    def _serve_events(self, ready):
        """Serve the ready connections, then those that became ready meanwhile (a few
        times over): their records share the round's one commit."""
        for _ in range(ROUND_PASSES):
            for callback in ready:
                callback()
            if not self.store.pending:     # no commit to share
                return
            ready = self.poller.ready(0)
            if not ready:
                return

    def _end_round(self):
        """Commit the round's records, then send the replies that waited for them: a
        caller is never told of a start or an end that is not recorded."""
        self.store.end_batch()
        failed, self.failed_records = self.failed_records, []
        for call, _ in failed:      # all marked first: a release below starts none of them
            call.unrecorded = True
        for call, error in failed:
            self._unrecorded(call, error)
        waiting, self.after_commit = self.after_commit, []
        for step in waiting:
            step()

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
        if now >= self.next_runs_check:
            self.next_runs_check = now + RUNS_CHECK
            try:
                runs.close_ended(self.store)
            except Exception:
                log.exception("checking the runs of `arv-wrap env`")
        idle = now - self.last_activity
        if (not self.leaving and self.stopping is None and not self.calls
                and idle > self.idle_timeout
                and (idle > self.idle_timeout + CLEANUP_GRACE or not self._cleaning())):
            log.info("idle for %gs: leaving", self.idle_timeout)
            self.leaving = True
            self._unlink()
        self.after(TICK, self._tick)

    def _cleaning(self):
        """A backend still has jobs to cancel on its scheduler (one whose controller
        was away when they ended)."""
        with self.backend_lock:
            loaded = list(self.backends.values())
        return any(getattr(b, "cleaning", lambda: False)() for b in loaded)

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
            if protocol.peer_uid(conn) != self.uid:
                log.warning("refused a connection from uid %d", protocol.peer_uid(conn))
                conn.close()
                continue
            conn.setblocking(False)
            call = Call(conn)
            self.calls.add(call)
            self.last_activity = time.monotonic()
            self.poller.register(conn.fileno(), functools.partial(self._readable, call))
            self._readable(call)      # the request is often there already: no wake for it

    def _readable(self, call):
        if call.conn is None:       # closed by an earlier callback of the same round
            return
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
        messages = call.lines.read()
        for i, message in enumerate(messages):
            self._client_message(call, message, messages[i + 1:])
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

    def _send(self, call, data, fds=()):
        """Send now, or after the round's records are committed if it has written
        some (the reply may tell of them). False if the caller is gone; a reply that
        waits cannot fail here: the connection's end still reaches the loop.
        fds go with the first byte, and are closed here once sent."""
        conn = call.conn
        if self.store.pending:
            self.after_commit.append(lambda: self._deliver(conn, data, fds))
            return True
        return self._deliver(conn, data, fds)

    @staticmethod
    def _deliver(conn, data, fds=()):
        """Replies are short and the client reads them at once: one non-blocking send
        nearly always takes the whole; the rest, if any, is sent blocking (bounded)."""
        try:
            sent = socket.send_fds(conn, [data], fds) if fds else conn.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        finally:
            for fd in fds:
                os.close(fd)
        if sent == len(data):
            return True
        try:
            conn.settimeout(5)
            conn.sendall(data[sent:])
            return True
        except OSError:
            return False
        finally:
            try:
                conn.setblocking(False)
            except OSError:
                pass

    def _finish(self, call, line):
        """The final reply, then the connection closes."""
        if call.conn is not None:
            self._send(call, protocol.encode_line(line))
        self._close(call)

    def _close(self, call):
        if call.conn is not None:
            self.poller.unregister(call.conn.fileno())
            if self.store.pending:      # after the replies that wait for the commit
                self.after_commit.append(call.conn.close)
            else:
                call.conn.close()
            call.conn = None
        if call.job is not None:
            call.job.close()
            self.by_job.pop(call.job.id, None)
        if call.pidfd is not None:
            os.close(call.pidfd)
            call.pidfd = None
        if call.capture is not None:
            for fd in call.capture.callers.values():
                os.close(fd)
            call.capture.callers = {}
        if call.spooled:
            try:
                os.unlink(call.spooled)
            except FileNotFoundError:
                pass
            call.spooled = None
        self.cancel_timer(call.kill_timer)
        self.cancel_timer(call.pid_timer)
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
        call.state_unknown = request.state_left_out
        job.arrived = call.created
        self.by_job[job.id] = call
        if self.stopping:
            job.cancel(self.stopping)
        if job.reuse and not self.stopping:
            self._start_keying(call)
        else:
            self._dispatch(call)

    def _dispatch(self, call):
        """Hand the job to its backend."""
        if call.job.backend == "local":
            self._submit_local(call)
        else:
            self._dispatch_remote(call)

    def _record(self, call, **fields):
        """Write the job's record (once, before it may start; later calls update it).
        False, after telling the caller, when the state dir cannot take it."""
        job = call.job
        try:
            if "reason" in fields:
                fields["reason"] = job.redactor.text(fields["reason"])
            if call.recorded:
                self.store.update(job.id, **fields)
            else:
                self.store.insert({**job.record(), "dispatcher": self.pid, **fields},
                                  on_error=lambda e: self.failed_records.append((call, e)))
                call.recorded = True
            return True
        except Exception as e:
            self._unrecorded(call, e)
            return False

    def _unrecorded(self, call, error):
        """The job's record could not be written (now, or at the round's commit, before
        the caller was told anything): it fails, and nothing of it runs."""
        log.error("cannot record job %s: %s", call.job.id, error)
        if call.conn is not None:
            if call.claim:
                self._release(call)
            self._finish(call, f"fail cannot record the job in {self.state_dir}: {error}")

    def when_recorded(self, step):
        """step() once the round's records are committed (now if none wait)."""
        if self.store.pending:
            self.after_commit.append(step)
        else:
            step()

    def build_job(self, request):
        """(Job, warning) for a request, or (None, warning) to run it locally."""
        caller = self.envs.get(request)
        env = caller.values
        if b"ARV_WRAP_AS_JOB" in env:
            return self.driver_job(request, caller), None
        try:
            rules = self.rules.get(caller.whitelists)
        except (OSError, whitelist.WhitelistError) as e:
            return None, f"cannot read the rules ({e}); running {os.fsdecode(request.path)} locally"
        name = os.path.basename(request.path)
        rule = rules.match(request.argv, name, request.path)
        if rule is None:
            return None, None
        cpus, memory, time_limit, notes = whitelist.resources(rule, request.argv)
        secrets = self.redactor(caller, rules, request.argv)
        job_id = store.new_id()
        run = os.fsdecode(env.get(b"ARV_WRAP_RUN", b"")) or None
        parent = os.fsdecode(env.get(b"ARV_WRAP_JOB", b"")) or run
        backend = os.fsdecode(env.get(b"ARV_WRAP_BACKEND", b"")) or rule.backend or "local"
        job = Job(id=job_id, run=run, parent=parent, argv=request.argv, path=request.path,
                  cwd=request.cwd, env=caller.job_env(job_id, rule.nested, rule),
                  umask=request.umask, rlimits=request.rlimits, nice=request.nice,
                  ignored_signals=request.ignored_signals,
                  blocked_signals=request.blocked_signals, fds=request.fds,
                  cwd_fd=request.cwd_fd, cpus=cpus, memory=memory, time_limit=time_limit,
                  stdin=rule.stdin, nested=rule.nested, backend=backend,
                  on_backend_error=rule.on_backend_error, on_oversize=rule.on_oversize,
                  rule=rule, options=rule.options, notes=list(notes), redactor=secrets)
        job.client_pid = request.pid
        job.reuse = reuse_enabled(env, rule)
        return job, None

    def redactor(self, caller, rules, argv):
        """What the records and the log must not show of this call's secrets: the
        values of its caller's secret variables (names as the whitelists' `redact:`
        and the caller's ARV_WRAP_REDACT add to the defaults)."""
        patterns = caller.redact_patterns(rules.redact if rules else ())
        secrets = redact.Redactor(patterns, values=caller.secret_values(patterns))
        secrets.argv(argv)                   # and those its argv gives (--password=...)
        if len(self.log_redactor.values) < 10000:
            self.log_redactor.values |= secrets.values
        return secrets

    def driver_job(self, request, caller):
        """`arv-wrap --as-job`: the command itself is the job, a pipeline whose tools
        become its children (nested), with the CPUs it asked for; of a rule naming
        the driver, only its backend blocks (a partition, an account) apply."""
        env = caller.values
        job_id = store.new_id()
        run = os.fsdecode(env.get(b"ARV_WRAP_RUN", b"")) or None
        backend = os.fsdecode(env.get(b"ARV_WRAP_BACKEND", b"")) or "local"
        job_env = caller.job_env(job_id, True, None)
        del job_env[b"ARV_WRAP_AS_JOB"]          # its tools are ordinary calls
        fractional = getattr(backends.find_quietly(backend), "fractional_cpus", False)
        cpus = float(env[b"ARV_WRAP_AS_JOB"] or (0.1 if fractional else 1))
        job = Job(id=job_id, run=run, parent=os.fsdecode(env.get(b"ARV_WRAP_JOB", b"")) or run,
                  argv=request.argv, path=request.path, cwd=request.cwd, env=job_env,
                  umask=request.umask, rlimits=request.rlimits, nice=request.nice,
                  ignored_signals=request.ignored_signals,
                  blocked_signals=request.blocked_signals, fds=request.fds,
                  cwd_fd=request.cwd_fd, cpus=cpus, stdin="auto", nested=True,
                  backend=backend, options=self.driver_options(request, caller),
                  redactor=self.redactor(caller, None, request.argv))
        job.client_pid = request.pid
        return job

    def driver_options(self, request, caller):
        """The backend blocks of the rule that names an --as-job driver, if any (rules
        that cannot be read: none; the driver then runs with the backend's defaults)."""
        if not caller.whitelists:
            return {}
        try:
            rules = self.rules.get(caller.whitelists)
        except (OSError, whitelist.WhitelistError):
            return {}
        rule = rules.match(request.argv, os.path.basename(request.path), request.path)
        return rule.options if rule is not None else {}

    def backend(self, name):
        with self.backend_lock:
            if name not in self.backends:
                self.backends[name] = backends.load(name, self.env, self.state_dir)
            return self.backends[name]

    def _end(self, call, outcome, **fields):
        """Record how the job ended and give the caller its final reply (a job whose
        result may be kept for reuse first has its captures finished)."""
        if call.capture is not None and not call.capture.saving:
            self.finish_capture(call, outcome, fields)
            return
        self.record_end(call.job, outcome, **fields)
        if outcome.state == "exited" and outcome.message:
            self._send(call, protocol.encode_line(f"warn {outcome.message}"))
        reply = protocol.final_reply(outcome)
        if reply == protocol.status_reply(call.tool_status):
            self._close(call)       # the client ends as its tool did: one message less
        else:
            self._finish(call, reply)

    def record_end(self, job, outcome, **fields):
        """The job's final record fields; a state dir that cannot take them costs the
        record, not the caller's answer."""
        reasons = [*job.notes, outcome.reason] if outcome.reason else job.notes
        try:
            self.store.update(job.id,
                              reason=job.redactor.text("; ".join(r for r in reasons if r) or None),
                              backend=job.backend, cpus=job.cpus, memory=job.memory,
                              **final_fields(outcome), **{**outcome.usage, **fields})
        except Exception as e:
            log.error("cannot record the end of job %s: %s", job.id, e)

    def cancel(self, job_id, reason):
        """Cancel that job and every job below it that this dispatcher holds (the
        deepest first, so each ends as cancelled rather than as a caller gone);
        False if it holds none of them."""
        held = [c for c in self.calls if c.job is not None]
        below = [(depth, c) for c in held
                 for depth in [self._depth_below(c.job, job_id)] if depth is not None]
        for _, call in sorted(below, key=lambda item: -item[0]):
            self._cancel_call(call, reason)
        return bool(below)

    def _depth_below(self, job, ancestor):
        """How far below ancestor the job is (0: it is the job), or None."""
        current, depth = job.id, 0
        while current and depth < 1000:
            if current == ancestor:
                return depth
            held = self.by_job.get(current)
            if held is not None:
                current = held.job.parent
            else:
                record = self.store.get(current)
                current = record and record["parent"]
            depth += 1
        return None

    def _cancel_call(self, call, reason):
        job = call.job
        job.cancel(reason)
        if call.state == "queued":
            self._withdraw(call)
            self._end(call, local.cancelled_while_queued(job))
        elif call.state == "running":
            self._kill_local(call, reason)
        # "starting": killed when its pid arrives; "remote": its backend sees the cancel

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
    """Jobs a killed dispatcher held never got their end recorded: say so; and have
    their backends end what is left of them (a Slurm job whose srun died, a
    container), in the background."""
    abandoned = {}
    for job_id in dispatcher.store.orphans(is_dispatcher):
        record = dispatcher.store.get(job_id)
        if record and record["backend"] not in (None, "local"):
            abandoned.setdefault(record["backend"], []).append(record)
        dispatcher.store.update(
            job_id, state="failed", ended=store.now(),
            reason="its dispatcher died while it held the job (a local job that was running "
                   "finished, and its caller got its own status, which was not recorded)")
        log.warning("job %s: its dispatcher died; recorded as failed", job_id)
    for name, records in abandoned.items():
        threading.Thread(target=end_abandoned, args=(dispatcher, name, records),
                         daemon=True).start()


def end_abandoned(dispatcher, name, records):
    try:
        backend = dispatcher.backend(name)
        if hasattr(backend, "abandoned"):
            backend.abandoned(records)
    except Exception:
        log.exception("cannot end the %s jobs of a dead dispatcher", name)


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
        for handler in logging.getLogger().handlers:
            handler.addFilter(RedactingFilter())
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
    except (SystemExit, Exception) as e:     # start() words its own failures as SystemExit
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
