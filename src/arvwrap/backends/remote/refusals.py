"""What a listener refused, in the dispatcher's log, at a rate a flood cannot raise.

Per peer address and WINDOW: the first PER_WINDOW refusals get a line each
("<label>: refused a connection from 10.0.0.7: no token within 5s"); the rest are
counted, and one line at the window's end says how many and why. Past MAX_PEERS
addresses in a window, the others are counted together. Never the bytes a
connection sent: they may be a real token, mistyped.
"""
import collections
import logging
import time

log = logging.getLogger("arvwrap.dispatcher")
WINDOW = 10.0
PER_WINDOW = 5
MAX_PEERS = 32
OTHERS = "other addresses"


class RefusalLog:
    def __init__(self, label):
        self.label = label
        self.window_start = time.monotonic()
        self.logged = collections.Counter()        # peer -> lines written this window
        self.counted = {}                          # peer -> Counter(reason) not written
        self.short_logged_at = None

    def refused(self, peer, why):
        self.flush()
        if peer not in self.logged and len(self.logged) >= MAX_PEERS:
            peer = OTHERS
        if self.logged[peer] < PER_WINDOW and peer != OTHERS:
            self.logged[peer] += 1
            log.warning("%s: refused a connection from %s: %s", self.label, peer, why)
        else:
            self.logged[peer] += 0
            self.counted.setdefault(peer, collections.Counter())[why] += 1

    def short_of_descriptors(self, budget, error=None):
        now = time.monotonic()
        if self.short_logged_at is not None and now - self.short_logged_at < WINDOW:
            return
        self.short_logged_at = now
        log.warning("%s: not accepting connections for now: %d of %d descriptors open, "
                    "%d kept for local calls%s", self.label, budget.open, budget.limit,
                    budget.reserve(), f" ({error})" if error else "")

    def flush(self, now=None):
        """At the window's end: one line per peer for what was only counted."""
        now = time.monotonic() if now is None else now
        if now - self.window_start < WINDOW:
            return
        for peer, reasons in self.counted.items():
            total = sum(reasons.values())
            why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
            more = "" if peer == OTHERS else " more"
            log.warning("%s: refused %d%s connections from %s in the last %gs (%s)",
                        self.label, total, more, peer, round(now - self.window_start), why)
        self.window_start = now
        self.logged.clear()
        self.counted.clear()
