"""The Slurm backend (arvwrap.backends.slurm.backend): one Slurm job per redirected
call, run by one srun. Its parts, one concern each: settings (ARV_WRAP_SLURM_* and
the `slurm:` block), cluster (Slurm's commands, nodes, config), sizing (how big a
job may be), command (srun's command line and environment), messages (what srun
says), srun (one job from submission to outcome)."""
from arvwrap.backends.slurm.backend import Backend
from arvwrap.backends.slurm.cluster import controller_address, parse_slurm_time, route_address
from arvwrap.backends.slurm.settings import Options, Settings
from arvwrap.backends.slurm.srun import Live, job_name

__all__ = ["Backend", "Live", "Options", "Settings", "controller_address", "job_name",
           "parse_slurm_time", "route_address"]
