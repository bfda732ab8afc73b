/*
 * arv-wrap-client: the program the shim execs in place of a whitelisted tool.
 *
 *   arv-wrap-client --shim IDX RESOLVED [ARGV...]   hand the call to the dispatcher
 *   ARGV... with ARV_WRAP_CALL=IDX:RESOLVED first in the environment: the same
 *       (the shim's environment form, for an argv too long to copy on its stack;
 *       the entry is taken out of the environment before anything else)
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

#define CALL_VAR "ARV_WRAP_CALL="

/* The environment form: IDX and RESOLVED from the ARV_WRAP_CALL entry, which is
 * removed from environ (every copy of it); 0 if there is none. */
static int take_call(char *idx, size_t size, const char **resolved)
{
    const char *call = NULL;
    char **out = environ;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, CALL_VAR, sizeof CALL_VAR - 1) == 0) {
            if (!call)
                call = *e + sizeof CALL_VAR - 1;
        } else {
            *out++ = *e;
        }
    }
    *out = NULL;
    if (!call)
        return 0;
    size_t n = strspn(call, "0123456789");
    if (n == 0 || n >= size || call[n] != ':' || call[n + 1] != '/')
        usage();
    memcpy(idx, call, n);
    idx[n] = '\0';
    *resolved = call + n + 1;
    return 1;
}

int main(int argc, char **argv)
{
    char idx[16];
    const char *resolved;
    if (take_call(idx, sizeof idx, &resolved) && argc >= 1)
        run_shim(idx, resolved, argv);
    if (argc >= 4 && !strcmp(argv[1], "--shim"))
        run_shim(argv[2], argv[3], argv + 4);
    usage();
}
