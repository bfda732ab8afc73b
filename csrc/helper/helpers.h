#ifndef ARVWRAP_HELPER_HELPERS_H
#define ARVWRAP_HELPER_HELPERS_H
/* The Slurm backend's relay (on the node) and launcher (in front of srun). */
_Noreturn void run_relay(const char *path, char **args);   /* args: see relay.c ("+") */
_Noreturn void run_launch(int argc, char **argv);
#endif
