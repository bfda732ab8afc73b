"""The one interface every backend implements, and what it declares about itself.

A backend is one class, subclass of ``Backend``, registered under its name (built in,
or by another package through the ``arvwrap.backends`` entry point group: see
arvwrap.backends). The dispatcher builds it once, the first time a job asks for it,
and calls it from several threads.

What a backend declares (class attributes, read without building it)
---------------------------------------------------------------------
``name``                 what ``-b``, ``ARV_WRAP_BACKEND`` and ``backend:`` say
``Settings``             a dataclass: its settings from the environment, read when it
                         is built; field ``f`` is ``ARV_WRAP_<NAME>_<F>`` (see
                         arvwrap.backends.settings for the types understood)
``Options``              a dataclass, or None: its block in the whitelist, ``<name>:``
                         at the top of a file and in a tool entry; its fields are the
                         keys (a tool's keys replace its file's; a list field with
                         ``metadata={"merge": "append"}`` adds to it; a field's
                         ``metadata["check"](value)`` returns an error text, or None)
``carries_descriptors``  the tool can reach the caller's descriptors beyond 0-2 (the
                         ``/dev/fd/N`` of bash's ``<(...)``); if not, the dispatcher runs
                         such a call on the local backend and its record says why
``fractional_cpus``      ``cpus: 0.5`` is half a CPU (else whole CPUs are granted)
``relays_streams``       arv-wrap copies the tool's stdout and stderr to the caller's
                         (the tool does not write into the caller's own descriptors)
``shared_filesystem``    the cwd, the tool and its paths must be visible at the same
                         paths where the job runs (doctor checks what it can)
``process_state``        lines for ``arv-wrap check``: what of the caller's process
                         state reaches the tool, and what does not
``job_noun``             how a message names where the tool runs ("a Slurm job")

What a backend does (methods)
-----------------------------
``__init__(config, state_dir)``  built once per dispatcher (config: its Settings, or a
                         dict of them given in place of the environment's; state_dir:
                         the dispatcher's, for logs and spools); raise BackendError
                         if it cannot take jobs at all
``check() -> str``       one line saying that it answers and what it offers (doctor);
                         raise BackendError when it cannot answer
``largest() -> (cpus, memory bytes)``   the most one job can get
``run(job, started) -> Outcome``        run the job to its end (blocking: each job
                         has a thread of its own); call ``started(backend_id)`` once it
                         runs (``started(id, state="queued")`` while it waits there);
                         honour ``job.signal()``/``job.cancel()`` (``job.wake_fd``
                         becomes readable; ``job.take_signals()``). Options:
                         ``self.options(job)``. Trouble is an Outcome, never an
                         exception: ``Outcome("failed", message=...)`` is exit 125 and
                         that one ``arv-wrap:`` line; with ``run_locally=True`` the
                         backend could not run it at all and the rule's
                         ``on_backend_error`` decides.
``abandoned(records)``   (optional) end the jobs a killed dispatcher held there
``cleaning() -> bool``   (optional) cleanup still to do: the dispatcher stays for it
``doctor_checks(load, rules)``, ``doctor_probe(load, rules)``  (class methods, optional)
                         extra ``arv-wrap doctor`` lines, and the rule of its round trip

A remote backend (``RemoteBackend``) runs jobs elsewhere and is also asked in bulk,
by the shared machinery of arvwrap.backends.remote (one poller for all its jobs):
``poll(ids) -> {id: state}`` (one query for all; None when the query failed) and
``cancel(ids, signum=None) -> bool``.

The local backend is the embedded default: the client starts its jobs
(arvwrap.local_jobs), so it has no run().
"""
import dataclasses
import os
import re

from arvwrap.backends import settings as settings_mod

DESCRIPTOR_ARG = re.compile(rb"/dev/fd/\d|/proc/self/fd/\d|/proc/\d+/fd/\d")


class Backend:
    name = None
    Settings = settings_mod.NoSettings
    Options = None
    carries_descriptors = False
    fractional_cpus = False
    relays_streams = True
    shared_filesystem = False
    process_state = ()
    job_noun = "a job there"

    def __init__(self, config=None, state_dir=None):
        """config: a Settings, or a dict of settings given in place of the environment's."""
        if isinstance(config, self.Settings):
            self.settings = config
        else:
            self.settings = settings_mod.from_env(self.Settings, self.name, os.environ,
                                                  config or {})
        self.state_dir = state_dir

    def check(self):
        raise NotImplementedError

    def largest(self):
        raise NotImplementedError

    def run(self, job, started):
        raise NotImplementedError

    def abandoned(self, records):
        """The records of jobs a dispatcher that died held on this backend."""

    def cleaning(self):
        return False

    def options(self, job):
        """This backend's whitelist block for the job (its defaults if none was given)."""
        given = (getattr(job, "options", None) or {}).get(self.name)
        return given if given is not None else self.Options()

    @classmethod
    def doctor_checks(cls, load, rules):
        """[(ok, text)] for `arv-wrap doctor` beyond check(); load() builds the backend."""
        return []

    @classmethod
    def doctor_probe(cls, load, rules):
        """The tool entry (YAML lines after `- name:`) of doctor's round trip, as
        (name, argv, extra lines); or a text saying why it is skipped."""
        return "'true'", ["true"], ""


class RemoteBackend(Backend):
    def poll(self, ids):
        raise NotImplementedError

    def cancel(self, ids, signum=None):
        raise NotImplementedError


def names_descriptor(job):
    """Whether the call needs one of the caller's descriptors beyond 0-2."""
    return any(n > 2 for n in job.fds) or any(DESCRIPTOR_ARG.search(a) for a in job.argv[1:])


def must_run_locally(backend, job):
    """Why the job cannot go to backend (a class or instance) and runs on the local
    backend instead, or None."""
    if not backend.carries_descriptors and names_descriptor(job):
        return (f"an argument names one of the caller's descriptors (/dev/fd/N), "
                f"which {backend.job_noun} cannot reach")
    return None


def options_dict(options):
    """A backend's options as a plain dict (for `arv-wrap check` and the rules)."""
    return dataclasses.asdict(options) if options is not None else {}
