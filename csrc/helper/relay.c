/* The Slurm backend's relay (src/arvwrap/backends/slurm.py).
 *
 * --relay PATH ARGV0 ARGS... (srun runs it on the node; a word of the tool's argv
 * that is ":" or starts with "+" comes with a "+" in front, since srun would read a
 * bare ":" as the start of another job's command): connects fd 1 and then
 * fd 2 to ARV_WRAP_SLURM_HOST:ARV_WRAP_SLURM_PORT, each connection opened with
 * "o<token>\n" / "e<token>\n" (ARV_WRAP_SLURM_TOKEN) and kept once the dispatcher
 * answers "+" (it took it; a connection dropped before that is made again, within
 * ARV_WRAP_SLURM_CONNECT_TIMEOUT); gives PWD, SHLVL,
 * ARV_WRAP_DISABLE and BASH_ENV back the caller's values (ARV_WRAP_SLURM_<NAME> is
 * "=value", or absent when the caller had none; BASH_ENV is left alone when
 * absent), removes every ARV_WRAP_SLURM_* variable, and starts PATH with argv
 * ARGV0 ARGS... as its child (fork, then a raw execve syscall), which gets the
 * caller's nice (ARV_WRAP_SLURM_NICE, decimal; best effort), ignored signals and
 * signal mask (ARV_WRAP_SLURM_SIGIGN, _SIGBLK: hexadecimal, bit n-1 for signal n)
 * and only fds 0-2 of the relay's.
 *
 * The tool is a child rather than exec'd in place so that the relay can measure it
 * (there is no accounting database to ask): it waits for it with wait4 and, when
 * ARV_WRAP_SLURM_USAGE is set, writes "arv-wrap-relay: usage <utime us> <stime us>
 * <maxrss KiB>" (the tool and its reaped children) on srun's stderr. Meanwhile it
 * passes on every signal it gets except those from slurmstepd, its parent, which
 * signals every process of the step, the tool included. Then it ends as the tool
 * did: its exit status, or death by its signal (no core dump), so that the task's
 * status srun reports is the tool's.
 *
 * Its own failures: one "arv-wrap-relay: ..." line on the stderr it was given
 * (srun's, read by the backend), status 125 (126/127 for an exec failure, also
 * reported as "arv-wrap: PATH: ..." on the tool's stderr, the caller's).
 */
#include "helpers.h"
#include "../common/common.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>

static int relay_err = 2;           /* srun's stderr, kept (close-on-exec) after fd 2
                                       becomes the stream */

/* One "arv-wrap-relay: <parts...>" line on srun's stderr, then exit with status. */
static _Noreturn void relay_fail(int status, const char *a, const char *b, const char *c)
{
    const char *parts[] = {"arv-wrap-relay: ", a, b ? b : "", c ? c : "", "\n"};
    struct iovec v[5];
    for (int i = 0; i < 5; i++)
        v[i] = (struct iovec){(void *)parts[i], strlen(parts[i])};
    ssize_t r;
    do r = writev(relay_err, v, 5); while (r < 0 && errno == EINTR);
    _exit(status);
}

/* The dispatcher's answer once it has taken a connection for its job. Until then
 * the connection is one of possibly many strangers the dispatcher may drop (a
 * flood: see src/arvwrap/backends/remote/listener.py), so the relay waits for it,
 * and connects again after a drop, rather than write the tool's output into a
 * connection nobody reads. */
#define ACK '+'

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* ARV_WRAP_SLURM_CONNECT_TIMEOUT seconds (default 20): a submit host whose port the
 * node cannot reach (a firewall that drops the packets), or that keeps dropping our
 * connections, is then one clear failure, not a job that hangs. */
static long long connect_timeout_ms(void)
{
    const char *t = getenv("ARV_WRAP_SLURM_CONNECT_TIMEOUT");
    long ms = t && *t ? strtol(t, NULL, 10) * 1000 : 20000;
    return ms > 0 ? ms : 20000;
}

/* Wait until s is ready for events, at most until deadline: 1 ready, 0 timed out. */
static int wait_for(int s, short events, long long deadline)
{
    struct pollfd p = {s, events, 0};
    int r;
    do {
        long long left = deadline - now_ms();
        r = poll(&p, 1, left > 0 ? (int)left : 0);
    } while (r < 0 && errno == EINTR);
    return r;
}

/* connect(), given until deadline. */
static int connect_bounded(int s, const struct sockaddr *addr, socklen_t len, long long deadline)
{
    int flags = fcntl(s, F_GETFL);
    if (flags < 0 || fcntl(s, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    if (connect(s, addr, len) < 0) {
        if (errno != EINTR && errno != EINPROGRESS)
            return -1;
        int r = wait_for(s, POLLOUT, deadline);
        if (r <= 0) {
            errno = r == 0 ? ETIMEDOUT : errno;
            return -1;
        }
        int err = 0;
        socklen_t el = sizeof err;
        if (getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
            return -1;
        if (err) {
            errno = err;
            return -1;
        }
    }
    return fcntl(s, F_SETFL, flags);
}

/* Send the token line on a connected s and wait for the ACK: 1 taken, 0 dropped by
 * the dispatcher unread (worth another connection), -1 failed (errno). */
static int introduce(int s, const char *line, size_t len, long long deadline)
{
    for (size_t off = 0; off < len;) {
        ssize_t n = send(s, line + off, len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
            return 0;
        if (n <= 0)
            return -1;
        off += n;
    }
    int r = wait_for(s, POLLIN, deadline);
    if (r <= 0) {
        errno = r == 0 ? ETIMEDOUT : errno;
        return -1;
    }
    char ack;
    ssize_t n;
    do n = recv(s, &ack, 1, 0); while (n < 0 && errno == EINTR);
    if (n == 0 || (n < 0 && errno == ECONNRESET))
        return 0;
    if (n < 0)
        return -1;
    if (ack != ACK) {
        errno = EPROTO;
        return -1;
    }
    return 1;
}

/* Connect a stream to the dispatcher, introduced by "<kind><token>\n" and taken (its
 * ACK), and make it fd target. */
static void relay_stream(const char *host, const char *port, char kind, const char *token,
                         int target)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc)
        relay_fail(STATUS_ARVWRAP, "cannot connect to ", host, rc == EAI_SYSTEM
                   ? strerror(errno) : gai_strerror(rc));
    size_t tl = strlen(token);
    char *line = malloc(tl + 2);
    if (!line)
        relay_fail(STATUS_ARVWRAP, "out of memory", NULL, NULL);
    line[0] = kind;
    memcpy(line + 1, token, tl);
    line[tl + 1] = '\n';
    char where[300];
    snprintf(where, sizeof where, "%s:%s: ", host, port);
    long long deadline = now_ms() + connect_timeout_ms();
    int s = -1, drops = 0;
    for (long long pause = 10;; pause = pause < 500 ? pause * 2 : 500) {
        int err = 0, taken = -1;
        for (ai = res; ai && taken < 0; ai = ai->ai_next) {
            s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
            if (s >= 0 && connect_bounded(s, ai->ai_addr, ai->ai_addrlen, deadline) == 0)
                taken = introduce(s, line, tl + 2, deadline);
            if (taken == 1)
                break;
            err = errno;
            if (s >= 0)
                close(s);
            s = -1;
            if (taken == 0)
                break;              /* it listens there, and dropped us: try again */
        }
        if (taken == 1)
            break;
        if (taken < 0)
            relay_fail(STATUS_ARVWRAP, "cannot connect to ", where, strerror(err));
        drops++;
        if (now_ms() + pause >= deadline) {
            char why[100];
            snprintf(why, sizeof why, "it dropped the connection %d times before taking it "
                     "(too many connections without a token?)", drops);
            relay_fail(STATUS_ARVWRAP, "cannot connect to ", where, why);
        }
        struct timespec t = {0, pause * 1000000};
        while (nanosleep(&t, &t) < 0 && errno == EINTR)
            ;
    }
    freeaddrinfo(res);
    free(line);
    if (dup2(s, target) < 0)
        relay_fail(STATUS_ARVWRAP, "dup2: ", strerror(errno), NULL);
    close(s);
}

/* NAME gets the caller's value back from ARV_WRAP_SLURM_<saved>: "=value", or absent. */
static void restore_var(const char *name, const char *saved, int unset_if_absent)
{
    const char *v = getenv(saved);
    if (v && *v == '=')
        setenv(name, v + 1, 1);
    else if (unset_if_absent)
        unsetenv(name);
}

/* The caller's process state that slurmstepd does not pass on to the task. */
struct callers_state {
    int has_nice, nice;
    int has_ignored, has_blocked;
    unsigned long long ignored, blocked;
};

static int parse_hex(const char *s, unsigned long long *out)
{
    char *end;
    if (!s || !*s)
        return 0;
    errno = 0;
    *out = strtoull(s, &end, 16);
    return !*end && !errno;
}

static void read_callers_state(struct callers_state *st)
{
    const char *n = getenv("ARV_WRAP_SLURM_NICE");
    char *end;
    if (n && *n) {
        long v = strtol(n, &end, 10);
        st->has_nice = !*end && v >= -20 && v <= 19;
        st->nice = (int)v;
    }
    st->has_ignored = parse_hex(getenv("ARV_WRAP_SLURM_SIGIGN"), &st->ignored);
    st->has_blocked = parse_hex(getenv("ARV_WRAP_SLURM_SIGBLK"), &st->blocked);
}

/* In the tool's process, just before the exec; mask: the relay's own, for a caller
 * whose mask is not known. */
static void apply_callers_state(const struct callers_state *st, const sigset_t *mask_as_is)
{
    if (st->has_nice)   /* raising priority needs privilege: then the node's nice stays */
        setpriority(PRIO_PROCESS, 0, st->nice);
    sigset_t mask;
    sigemptyset(&mask);
    for (int sig = 1; sig <= 64 && sig < NSIG; sig++) {
        unsigned long long bit = 1ULL << (sig - 1);
        if (st->has_ignored) {   /* also undo what Slurm may have ignored (EINVAL: KILL, STOP) */
            struct sigaction sa = {.sa_handler = st->ignored & bit ? SIG_IGN : SIG_DFL};
            sigaction(sig, &sa, NULL);
        }
        if (st->blocked & bit)
            sigaddset(&mask, sig);
    }
    sigprocmask(SIG_SETMASK, st->has_blocked ? &mask : mask_as_is, NULL);
}

/* The relay's end, once the tool's: its status, or its signal with the default
 * action and no core dump. */
static _Noreturn void end_as(int status)
{
    if (WIFEXITED(status))
        _exit(WEXITSTATUS(status));
    int sig = WTERMSIG(status);
    struct rlimit core;
    if (getrlimit(RLIMIT_CORE, &core) == 0) {
        core.rlim_cur = 0;
        setrlimit(RLIMIT_CORE, &core);
    }
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigaction(sig, &dfl, NULL);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, sig);
    kill(getpid(), sig);                        /* pending until unblocked here */
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    _exit(128 + sig);
}

static long long usec(struct timeval t)
{
    return (long long)t.tv_sec * 1000000 + t.tv_usec;
}

static _Noreturn void run_tool(const char *path, char **argv, const struct callers_state *st,
                               int report_usage)
{
    /* Every signal waits for sigwaitinfo below from now on, so none is lost between
     * the fork and the loop, and the tool's pid stays its own until wait4 reaps it. */
    sigset_t all, as_is;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &as_is);
    struct sigaction dfl = {.sa_handler = SIG_DFL}, chld;
    sigaction(SIGCHLD, &dfl, &chld);           /* an ignored SIGCHLD would reap the tool */
    pid_t relay = getpid(), pid = fork();
    if (pid < 0)
        relay_fail(STATUS_ARVWRAP, "fork: ", strerror(errno), NULL);
    if (pid == 0) {
        /* killed alone (SIGKILL), the relay takes the tool along: once reparented,
         * the tool would be out of reach of Slurm's process tracking */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != relay)
            _exit(STATUS_ARVWRAP);
        sigaction(SIGCHLD, &chld, NULL);
        apply_callers_state(st, &as_is);
        syscall(SYS_execve, path, argv, environ);
        int err = errno;
        say(path, ": ", strerror(err));         /* the caller sees it on its stderr */
        relay_fail(exec_status(err), path, ": ", strerror(err));
    }
    /* the tool's descriptors are the tool's alone: the dispatcher sees its streams
     * end, and srun its stdin closed, when the tool closes them */
    close(0);
    close(1);
    close(2);
    pid_t parent = getppid();
    int status;
    struct rusage ru;
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&all, &si);
        if (sig < 0)
            continue;
        if (sig == SIGCHLD) {
            if (wait4(pid, &status, WNOHANG, &ru) == pid)
                break;
            continue;
        }
        /* sent by a process (not the kernel, about the relay itself), and not by
         * slurmstepd, whose signals reach every process of the step: the tool too */
        if (si.si_code <= 0 && si.si_pid != parent)
            kill(pid, sig);
    }
    if (report_usage) {
        char line[128];
        int n = snprintf(line, sizeof line, "arv-wrap-relay: usage %lld %lld %ld\n",
                         usec(ru.ru_utime), usec(ru.ru_stime), ru.ru_maxrss);
        write_full(relay_err, line, n);
    }
    end_as(status);
}

_Noreturn void run_relay(const char *path, char **args)
{
    const char *host = getenv("ARV_WRAP_SLURM_HOST"), *port = getenv("ARV_WRAP_SLURM_PORT");
    const char *token = getenv("ARV_WRAP_SLURM_TOKEN");
    if (!host || !*host || !port || !*port || !token || !*token)
        relay_fail(STATUS_ARVWRAP, "ARV_WRAP_SLURM_HOST, _PORT or _TOKEN is not set", NULL, NULL);
    int err_copy = fcntl(2, F_DUPFD_CLOEXEC, 3);
    if (err_copy < 0)
        relay_fail(STATUS_ARVWRAP, "cannot keep srun's stderr: ", strerror(errno), NULL);
    relay_err = err_copy;
    relay_stream(host, port, 'o', token, 1);
    relay_stream(host, port, 'e', token, 2);
    restore_var("PWD", "ARV_WRAP_SLURM_PWD", 1);
    restore_var("SHLVL", "ARV_WRAP_SLURM_SHLVL", 1);
    restore_var("ARV_WRAP_DISABLE", "ARV_WRAP_SLURM_DISABLE", 1);
    restore_var("BASH_ENV", "ARV_WRAP_SLURM_BASH_ENV", 0);
    struct callers_state st = {0};
    read_callers_state(&st);
    int report_usage = getenv("ARV_WRAP_SLURM_USAGE") != NULL;
    for (size_t i = 0; environ[i];) {               /* every ARV_WRAP_SLURM_* goes */
        if (!strncmp(environ[i], "ARV_WRAP_SLURM_", 15)) {
            char name[256];
            size_t n = strcspn(environ[i], "=");
            if (n < sizeof name) {
                memcpy(name, environ[i], n);
                name[n] = 0;
                unsetenv(name);
                continue;
            }
        }
        i++;
    }
    for (char **a = args; *a; a++)                  /* "+WORD": see the header */
        if (**a == '+')
            ++*a;
    if (!args[0])
        relay_fail(STATUS_ARVWRAP, "no argv[0] for the tool", NULL, NULL);
    run_tool(path, args, &st, report_usage);
}

