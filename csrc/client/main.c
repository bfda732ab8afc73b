/*
 * arv-wrap-client: the program the shim execs in place of a whitelisted tool.
 *
 *   arv-wrap-client --shim IDX RESOLVED [ARGV...]   hand the call to the dispatcher (handoff.c)
 *   arv-wrap-client --exec CMD [ARGS...]            execvp(CMD) (the shim hooks it)
 *   arv-wrap-client --relay ARGV0 PATH [ARGS...]     a Slurm task on the node (relay.c)
 *   arv-wrap-client --launch PPID [-u UMASK] [-l RES:SOFT:HARD]... -- PATH [ARGS...]
 *                                                    start srun for the Slurm backend (launch.c)
 *
 * One binary, so that one path (next to the shim) names every helper, on the
 * nodes too. Each mode lives in its own file; the protocol is in wire.c, finding
 * and starting the dispatcher in connect.c.
 */
#include "common.h"
#include "handoff.h"
#include "slurm_helpers.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

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
        run_relay(argv[2], argv[3], argv + 4);
    if (argc >= 3 && !strcmp(argv[1], "--launch"))
        run_launch(argc - 2, argv + 2);
    if (argc >= 4 && !strcmp(argv[1], "--shim"))
        run_shim(argv[2], argv[3], argv + 4);
    if (argc >= 3 && !strcmp(argv[1], "--exec"))
        run_exec(argv + 2);
    usage();
}
