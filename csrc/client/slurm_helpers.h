#ifndef ARVWRAP_CLIENT_SLURM_HELPERS_H
#define ARVWRAP_CLIENT_SLURM_HELPERS_H
/* The Slurm backend's relay (on the node) and launcher (in front of srun). */
_Noreturn void run_relay(const char *argv0, const char *path, char **args);
_Noreturn void run_launch(int argc, char **argv);
#endif
