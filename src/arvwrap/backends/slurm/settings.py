"""The Slurm backend's settings (ARV_WRAP_SLURM_*), its whitelist block (`slurm:`),
and what `arv-wrap check` says crosses to the node."""
from dataclasses import dataclass, field
from typing import List, Optional

from arvwrap.backends.remote.listener import Limits

MIB = 1 << 20
ENV_DROP = (b"SLURM_", b"SBATCH_", b"SALLOC_", b"SRUN_")


def _positive(kind):
    def parse(text):
        value = kind(float(text)) if kind is int else kind(text)
        if value <= 0:
            raise ValueError(text)
        return value
    return {"parse": parse, "expected": "a number > 0"}


@dataclass
class Settings:
    """ARV_WRAP_SLURM_SUBMIT_RATE, _MAX_JOBS, _POLL, _TIMEOUT, _LISTEN, _HOST,
    _CONNECT_TIMEOUT, _HANDSHAKE, _STRANGERS_PER_PEER, _STRANGERS_MAX (docs/slurm.md)."""
    submit_rate: float = 10.0      # submissions per second
    max_jobs: int = field(default=500, metadata={"parse": lambda text: int(float(text)),
                                                 "expected": "a number"})
    poll: float = 2.0              # s between batched squeue rounds (0.2 at least)
    timeout: float = 20.0          # s to wait for a controller that does not answer
    listen: Optional[str] = None   # where the listeners bind (else found: Backend.where)
    host: Optional[str] = None     # the address the nodes connect to (else found)
    connect_timeout: Optional[str] = None   # the relay's, on the node (default 20 s)
    # what holds the listeners against connections that bring no token (strangers)
    handshake: float = field(default=5.0, metadata=_positive(float))   # s to send one
    strangers_per_peer: int = field(default=64, metadata=_positive(int))
    strangers_max: int = field(default=512, metadata=_positive(int))

    def limits(self):
        """The listeners' limits (arvwrap.backends.remote.listener)."""
        return Limits(handshake=self.handshake, per_peer=self.strangers_per_peer,
                      total=self.strangers_max)


@dataclass
class Options:
    """The whitelist's `slurm:` block (a file's, then its tools')."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    extra: List[str] = field(default_factory=list, metadata={"merge": "append"})

# What of the caller's process state reaches the tool on the node, for `arv-wrap check`
# (srun carries the environment, the cwd path, umask and soft limits; the relay the rest).
PROCESS_STATE = (
    "crosses to the node: argv, environment (minus SLURM_*, SBATCH_*, SALLOC_*, SRUN_*; "
    "Slurm adds its SLURM_*, SRUN_DEBUG and, if unset, TMPDIR), cwd path, umask, soft "
    "rlimits (as PropagateResourceLimits says), nice (if the node lets the user set it), "
    "ignored signals, signal mask",
    "does not cross: descriptors other than 0-2 (a /dev/fd argument runs the call on the "
    "local backend), credentials beyond the user (the job has the gid and groups Slurm "
    "looks up for the user), hard rlimits and the msgqueue, nice, rtprio, rttime and "
    "sigpending limits, CPU affinity, cgroup, namespaces, oom_score_adj, no_new_privs",
    "stdout and stderr are sockets; stdin goes through srun as the rule's stdin says",
)
