/* The Slurm backend's launcher (src/arvwrap/backends/slurm.py).
 *
 * --launch PPID [-u UMASK] [-l RES:SOFT:HARD]... -- PATH ARGS... (the dispatcher
 * runs it in front of srun): PR_SET_PDEATHSIG SIGKILL (and exit 125 if the parent
 * PPID is already gone), then each rlimit RES (its number) to SOFT:HARD ("u" for
 * unlimited), then the umask (octal), then a raw execve of PATH.
 */
#include "helpers.h"
#include "../common/common.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>

static int parse_limit(const char *s, rlim_t *out, const char **end)
{
    if (*s == 'u') {
        *out = RLIM_INFINITY;
        *end = s + 1;
        return 0;
    }
    char *e;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 10);
    if (e == s || errno)
        return -1;
    *out = (rlim_t)v;
    *end = e;
    return 0;
}

_Noreturn void run_launch(int argc, char **argv)
{
    /* argv: PPID [-u UMASK] [-l RES:SOFT:HARD]... -- PATH [ARGS...] */
    const char *end;
    char *e;
    long ppid = strtol(argv[0], &e, 10);
    if (e == argv[0] || *e || ppid < 1 || ppid > INT_MAX)
        usage();
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
        fail("PR_SET_PDEATHSIG: ", strerror(errno));
    if (getppid() != (pid_t)ppid)
        _exit(STATUS_ARVWRAP);                      /* the dispatcher is already gone */
    int i = 1, mask = -1;
    for (; i < argc && strcmp(argv[i], "--"); i += 2) {
        if (i + 1 >= argc)
            usage();
        if (!strcmp(argv[i], "-u")) {
            long m = strtol(argv[i + 1], &e, 8);
            if (*e || m < 0 || m > 0777)
                usage();
            mask = (int)m;
        } else if (!strcmp(argv[i], "-l")) {
            struct rlimit rl;
            long res = strtol(argv[i + 1], &e, 10);
            end = e;
            if (e == argv[i + 1] || res < 0 || res > 63 || *end != ':' || parse_limit(end + 1, &rl.rlim_cur, &end) || *end != ':'
                || parse_limit(end + 1, &rl.rlim_max, &end) || *end)
                usage();
            if (setrlimit((int)res, &rl) < 0)
                fail("cannot set resource limit ", argv[i + 1], " for srun: ", strerror(errno));
        } else {
            usage();
        }
    }
    if (i + 1 >= argc)
        usage();
    if (mask >= 0)
        umask(mask);
    syscall(SYS_execve, argv[i + 1], argv + i + 1, environ);
    int err = errno;
    say(argv[i + 1], ": ", strerror(err));
    _exit(exec_status(err));
}

