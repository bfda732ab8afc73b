"""The submission throttle: at most `rate` submissions per second (bursts of up to
one second's worth) and `limit` jobs in flight, first come first served."""
import threading
import time


class Throttle:
    """At most `rate` submissions per second and `limit` jobs in flight, first come first served."""

    def __init__(self, rate, limit):
        self.rate = rate
        self.limit = limit
        self.in_flight = 0
        self.tokens = max(1.0, rate)
        self.stamp = time.monotonic()
        self.queue = []
        self.cond = threading.Condition()

    def acquire(self, job):
        """Wait for a slot; False if the job was cancelled meanwhile."""
        with self.cond:
            job.on_wake = self.wake
            self.queue.append(job)
            try:
                while True:
                    if job.cancel_reason:
                        return False
                    self._refill()
                    if (self.queue[0] is job and self.in_flight < self.limit
                            and self.tokens >= 1):
                        self.tokens -= 1
                        self.in_flight += 1
                        return True
                    wait = None
                    if self.tokens < 1 and self.rate > 0:
                        wait = (1 - self.tokens) / self.rate
                    self.cond.wait(wait)
            finally:
                self.queue.remove(job)
                job.on_wake = None
                self.cond.notify_all()

    def release(self):
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def wake(self):
        with self.cond:
            self.cond.notify_all()

    def _refill(self):
        now = time.monotonic()
        if self.rate > 0:
            self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        else:
            self.tokens = 1.0
        self.stamp = now
