"""What every backend whose jobs run elsewhere needs, in one module each:

``relay``     the TCP listener the tool's stdout and stderr connect back to
``streams``   copying one such connection to the caller's descriptor (and a kept log)
``spool``     the caller's stdin: reopened, passed, or drained into a spool file
``throttle``  submissions per second and jobs in flight
``poller``    one batched status query per interval for all jobs of a backend
``guard``     every background thread above: a crash is logged, fails the jobs it
              concerns, and restarts the thread or stops the backend
``fds``       small descriptor helpers (poll without select's 1024 limit)
"""
