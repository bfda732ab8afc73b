/*
 * arv-wrap-client: the program the shim execs in place of a whitelisted tool.
 *
 *   arv-wrap-client --shim IDX RESOLVED [ARGV...]   hand the call to the dispatcher
 *
 * It runs once per redirected call, so it is linked statically where the system
 * allows (no dynamic loading: a fraction of a millisecond per call). Its parts:
 * handoff.c (the call, its signals, running a local job), wire.c (the protocol),
 * connect.c (finding and starting the dispatcher). Everything else arv-wrap runs
 * is in arv-wrap-helper (csrc/helper/).
 */
#include "../common/common.h"
#include "handoff.h"

#include <string.h>
#include <unistd.h>

_Noreturn void usage(void)
{
    static const char msg[] = "usage: arv-wrap-client --shim IDX RESOLVED [ARGV...]\n";
    ssize_t n = write(2, msg, sizeof msg - 1);
    (void)n;
    _exit(2);
}

int main(int argc, char **argv)
{
    if (argc >= 4 && !strcmp(argv[1], "--shim"))
        run_shim(argv[2], argv[3], argv + 4);
    usage();
}
