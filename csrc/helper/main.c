/*
 * arv-wrap-helper: the programs arv-wrap runs besides the client.
 *
 *   arv-wrap-helper --exec CMD [ARGS...]            execvp(CMD): the shim preloaded in
 *                                                   this (dynamic) program hooks it
 *   arv-wrap-helper --relay PATH ARGV0 [ARGS...]     a Slurm task on the node (relay.c)
 *   arv-wrap-helper --launch PPID [-u UMASK] [-l RES:SOFT:HARD]... -- PATH [ARGS...]
 *                                                    start srun for the Slurm backend (launch.c)
 *
 * Dynamically linked: --exec needs the shim loaded, and --relay resolves host
 * names (NSS) on the nodes.
 */
#include "../common/common.h"
#include "helpers.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

_Noreturn void usage(void)
{
    static const char msg[] = "usage: arv-wrap-helper --exec CMD [ARGS...]"
                              " | --relay PATH ARGV0 [ARGS...]"
                              " | --launch PPID [-u UMASK] [-l RES:SOFT:HARD]... -- PATH"
                              " [ARGS...]\n";
    ssize_t n = write(2, msg, sizeof msg - 1);
    (void)n;
    _exit(2);
}

static _Noreturn void run_exec(char **cmd)
{
    execvp(cmd[0], cmd);
    int err = errno;
    say(cmd[0], ": ", strerror(err));
    _exit(exec_status(err));
}

int main(int argc, char **argv)
{
    if (argc >= 4 && !strcmp(argv[1], "--relay"))
        run_relay(argv[2], argv + 3);
    if (argc >= 3 && !strcmp(argv[1], "--launch"))
        run_launch(argc - 2, argv + 2);
    if (argc >= 3 && !strcmp(argv[1], "--exec"))
        run_exec(argv + 2);
    usage();
}
