/* --shim IDX RESOLVED ARGV...: hand a whitelisted call to the dispatcher, and be
 * the tool for the caller (docs/internals.md, sections 3 and 4).
 *
 *  - To the process that exec'd the tool, this program IS the tool: it exits with
 *    the job's status or dies of the job's signal (no core dump), and writes
 *    nothing to the tool's streams unless arv-wrap itself is the reason for a
 *    failure (then one "arv-wrap: ..." line on stderr, and status 125).
 *  - A local job ("run") is our own child: we fork and exec it once the
 *    dispatcher admits it, so it inherits everything the caller gave us (every
 *    descriptor, credentials and groups, nice, affinity, cgroup, namespaces,
 *    rlimits, umask, oom_score_adj, the signal mask and ignored signals). It stays
 *    in the caller's process group, so the terminal's signals reach it directly.
 *    It dies with us (PR_SET_PDEATHSIG), and finishes even if the dispatcher dies.
 *  - Signals: while the dispatcher holds the call, the caught ones go to it as
 *    "sig N" lines; while our child runs, one sent to us by anybody else goes to
 *    the child, and one the child sends to us (its parent) goes to our parent,
 *    as it would have without arv-wrap. A signal the caller ignored stays ignored.
 *  - All writes to the socket use MSG_NOSIGNAL, and every blocking call is
 *    retried on EINTR.
 */
#include "handoff.h"
#include "../common/common.h"
#include "connect.h"
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static const int caught[] = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM,
                             SIGWINCH};
#define N_CAUGHT (int)(sizeof caught / sizeof caught[0])

static int sock_fd = -1;
static volatile pid_t child;        /* the tool, while it runs as our child */
static sigset_t handled;            /* the signals we installed a handler for */
static sigset_t callers_mask;       /* the signal mask the caller gave us */
static sigset_t early;              /* caught signals pending when the child started */

/* ---------------------------------------------------------------- signals */

static void send_sig_line(int sig)
{
    char msg[16] = "sig ", digits[8];
    int n = 0, len = 4;
    do digits[n++] = (char)('0' + sig % 10); while ((sig /= 10) && n < 8);
    while (n)
        msg[len++] = digits[--n];
    msg[len++] = '\n';
    ssize_t r;
    do r = send(sock_fd, msg, len, MSG_NOSIGNAL); while (r < 0 && errno == EINTR);
}

static void on_signal(int sig, siginfo_t *si, void *context)
{
    (void)context;
    int saved = errno;
    pid_t c = child;
    if (c <= 0)
        send_sig_line(sig);
    else if (si->si_pid == c && si->si_code <= 0)
        kill(getppid(), sig);               /* the tool signalled its parent */
    else if (si->si_code != SI_KERNEL || sigismember(&early, sig))
        kill(c, sig);                       /* (the terminal's own reach the tool directly) */
    sigdelset(&early, sig);
    errno = saved;
}

/* Install the handlers with the caught signals blocked (the caller's mask saved),
 * leaving ignored signals ignored. */
static void start_forwarding(void)
{
    struct sigaction sa = {.sa_sigaction = on_signal, .sa_flags = SA_RESTART | SA_SIGINFO}, prev;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < N_CAUGHT; i++)
        sigaddset(&sa.sa_mask, caught[i]);
    sigprocmask(SIG_BLOCK, &sa.sa_mask, &callers_mask);
    sigemptyset(&handled);
    for (int i = 0; i < N_CAUGHT; i++) {
        if (sigaction(caught[i], &sa, &prev) == 0 && prev.sa_handler == SIG_IGN)
            sigaction(caught[i], &prev, NULL);
        else
            sigaddset(&handled, caught[i]);
    }
}

static void block_caught(void)
{
    sigprocmask(SIG_BLOCK, &handled, NULL);
}

static _Noreturn void die_of_signal(int sig)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_CORE, &rl) == 0) {
        rl.rlim_cur = 0;
        setrlimit(RLIMIT_CORE, &rl);
    }
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigaction(sig, &dfl, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    raise(sig);
    _exit(128 + sig);
}

/* ---------------------------------------------------------------- the local job */

static void send_text(const char *fmt, long long a, long long b, long long c, long long d)
{
    char line[128];
    int n = snprintf(line, sizeof line, fmt, a, b, c, d);
    if (write_full(sock_fd, line, n) < 0) {
        /* the dispatcher is gone: the tool's own status will do */
    }
}

/* NUL-separated NAME=value entries -> an envp (pointing into block). Called once. */
static char **split_env(char *block, size_t len)
{
    static char *space[1024];
    size_t n = 0;
    for (size_t i = 0; i < len; i++)
        n += block[i] == 0;
    char **envp = n < sizeof space / sizeof *space ? space : calloc(n + 1, sizeof *envp);
    char **e = envp;
    if (!envp)
        fail("out of memory");
    for (char *p = block; p < block + len; p += strlen(p) + 1)
        *e++ = p;
    return envp;
}

/* "fds T1 T2 ...": the descriptors that came with the replies become the tool's
 * T1, T2, ... (job reuse: pipes the dispatcher copies from, a spooled stdin). */
static int n_placed, placed_from[READER_FDS], placed_to[READER_FDS];

static void place_fds(const char *arg, struct reader *r)
{
    const char *end = arg;
    n_placed = 0;
    while (*end && n_placed < r->nfds) {
        long long target = parse_number(end, 0, 2, &end);
        if (target < 0)
            fail("bad reply from the dispatcher: fds ", arg);
        placed_from[n_placed] = r->fds[n_placed];
        placed_to[n_placed++] = (int)target;
        if (*end)
            end++;
    }
    if (*end)
        fail("bad reply from the dispatcher: fds ", arg, " (too few descriptors)");
}

struct launch {
    const char *path;
    char **argv, **envp;
    int stdin_none;
    pid_t parent;
    volatile int exec_errno;         /* written by the vfork child when exec fails */
};

/* In the vfork child (our memory, its own signal table): raw syscalls only. */
static _Noreturn void exec_tool(struct launch *l)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != l->parent)
        _exit(STATUS_ARVWRAP);                /* we died already */
    if (l->stdin_none) {
        int fd = open("/dev/null", O_RDONLY);
        if (fd > 0) {
            dup2(fd, 0);
            close(fd);
        }
    }
    for (int i = 0; i < n_placed; i++)       /* the sources are >= 10: none is a target */
        if (dup2(placed_from[i], placed_to[i]) < 0) {
            l->exec_errno = errno;
            _exit(127);
        }
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    for (int i = 0; i < N_CAUGHT; i++)        /* none of our handlers may run in here */
        if (sigismember(&handled, caught[i]))
            sigaction(caught[i], &dfl, NULL);
    sigprocmask(SIG_SETMASK, &callers_mask, NULL);
    syscall(SYS_execve, l->path, l->argv, l->envp);
    l->exec_errno = errno ? errno : ENOEXEC;
    _exit(127);
}

/* What the caller sees for the tool's wait status. */
static _Noreturn void end_as(int status)
{
    if (WIFSIGNALED(status))
        die_of_signal(WTERMSIG(status));
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : STATUS_ARVWRAP);
}

static void handle_line(const char *line, struct reader *r, const char *resolved, char **targv);

/* Become the tool, unredirected: a raw execve, which the shim loaded in us does not see. */
static _Noreturn void exec_in_place(const char *resolved, char **targv, char **envp)
{
    syscall(SYS_execve, resolved, targv, envp);
    int err = errno;
    say(resolved, ": ", strerror(err));
    _exit(exec_status(err));
}

/* "run": start the tool as our child, wait for it, report, then take the
 * dispatcher's final word (or, if it is gone, end as the tool did). */
static _Noreturn void run_here(struct launch *l, struct reader *r)
{
    block_caught();
    l->parent = getpid();
    l->exec_errno = 0;
    pid_t pid = vfork();
    if (pid < 0)
        fail("cannot start ", l->path, ": ", strerror(errno));
    if (pid == 0)
        exec_tool(l);
    int status;
    if (l->exec_errno) {
        int err = l->exec_errno;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        send_text("nostart %lld\n", err, 0, 0, 0);
        say(l->path, ": ", strerror(err));
        _exit(exec_status(err));
    }
    for (int i = 0; i < n_placed; i++)        /* the tool has them: our copies would */
        close(placed_from[i]);                /* keep its pipes open */
    child = pid;
    sigpending(&early);
    send_text("pid %lld\n", pid, 0, 0, 0);
    sigprocmask(SIG_SETMASK, &callers_mask, NULL);
    struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0)
        if (errno != EINTR)
            fail("waiting for ", l->path, ": ", strerror(errno));
    block_caught();                         /* it is gone: nothing more to forward */
    child = -1;
    send_text("done %lld %lld %lld %lld\n", status,
              ru.ru_utime.tv_sec * 1000000LL + ru.ru_utime.tv_usec,
              ru.ru_stime.tv_sec * 1000000LL + ru.ru_stime.tv_usec, ru.ru_maxrss);
    for (char *line; (line = read_line(r));)
        handle_line(line, NULL, l->path, l->argv);
    end_as(status);
}

/* "state": the caller's process state, which a remote backend rebuilds where the
 * tool runs. Sent with the caught signals blocked, so that no "sig N" line lands
 * inside it; a dispatcher that is gone shows as EOF on the next read. */
static void send_state(void)
{
    struct buf b = {0};
    build_state_line(&b, &callers_mask, &handled);
    block_caught();
    if (write_full(sock_fd, b.p, b.len) < 0) {
        /* the next read says the dispatcher is gone */
    }
    sigprocmask(SIG_SETMASK, &callers_mask, NULL);
    buf_release(&b);
}

/* ---------------------------------------------------------------- replies */

static void handle_line(const char *line, struct reader *r, const char *resolved, char **targv)
{
    const char *arg, *end;
    long long n;
    if ((arg = reply_is(line, "warn"))) {
        say(arg);
    } else if ((arg = reply_is(line, "job"))) {
        /* informational */
    } else if (reply_is(line, "state") && r) {      /* only before the tool runs */
        send_state();
    } else if ((arg = reply_is(line, "fds")) && r) {
        place_fds(arg, r);
    } else if (reply_is(line, "local") && r) {      /* never once the tool ran here */
        exec_in_place(resolved, targv, environ);
    } else if ((arg = reply_is(line, "exit"))) {
        if ((n = parse_number(arg, 0, 255, &end)) < 0 || *end)
            fail("bad reply from the dispatcher: ", line);
        _exit((int)n);
    } else if ((arg = reply_is(line, "signal"))) {
        if ((n = parse_number(arg, 1, NSIG - 1, &end)) < 0)
            fail("bad reply from the dispatcher: ", line);
        if (*end)
            say(end + 1);
        die_of_signal((int)n);
    } else if ((arg = reply_is(line, "fail"))) {
        fail(arg);
    } else if ((arg = reply_is(line, "run")) && r) {
        if ((n = parse_number(arg, 1, 1LL << 30, &end)) < 0)
            fail("bad reply from the dispatcher: ", line);
        struct launch l = {.path = resolved, .argv = targv,
                           .stdin_none = !strcmp(end, " stdin-none")};
        char *block = read_block(r, (size_t)n);
        if (!block)
            fail("lost the dispatcher");
        l.envp = split_env(block, (size_t)n);
        run_here(&l, r);
    }
    /* anything else: a newer dispatcher's informational line; ignore it */
}

/* ---------------------------------------------------------------- probe mode */

static int probe(const char *file, const char *idx, const char *resolved, char **targv)
{
    struct buf b = {0};
    put_str(&b, idx);
    put_str(&b, resolved);
    for (char **a = targv; *a; a++)
        put_str(&b, *a);
    buf_add(&b, "\n", 1);
    int fd;
    do fd = open(file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        fail(file, ": ", strerror(errno));
    ssize_t n;                           /* one write: O_APPEND keeps records whole */
    do n = write(fd, b.p, b.len); while (n < 0 && errno == EINTR);
    if (n != (ssize_t)b.len)
        fail(file, ": ", n < 0 ? strerror(errno) : "short write");
    return 0;
}

static int is_decimal(const char *s)
{
    size_t n = strspn(s, "0123456789");
    return n > 0 && n < 10 && !s[n];
}

_Noreturn void run_shim(const char *idx, const char *resolved, char **targv)
{
    if (!is_decimal(idx))
        usage();
    const char *probe_file = getenv("ARV_WRAP_PROBE");
    if (probe_file && *probe_file)
        _exit(probe(probe_file, idx, resolved, targv));
    struct fdlist fds;
    collect_fds(&fds, targv);                       /* before we open anything else */
    static char request_space[1 << 16];             /* no malloc (and its mmaps) for the */
    struct buf req = {request_space, 0, sizeof request_space, 1};   /* usual request */
    build_request(&req, idx, resolved, targv, &fds);
    char why[PATH_MAX + 128];
    sock_fd = connect_dispatcher(why, sizeof why);
    if (sock_fd < 0) {                              /* no dispatcher of ours: as without us */
        say("running ", resolved, " locally, not as a job: ", why);
        exec_in_place(resolved, targv, environ_without_shim());   /* nor its children */
    }
    start_forwarding();
    send_request(sock_fd, &req, &fds);
    buf_release(&req);
    sigprocmask(SIG_SETMASK, &callers_mask, NULL);  /* pending signals get forwarded now */
    static struct reader r;
    r.fd = sock_fd;
    for (char *line; (line = read_line(&r));)
        handle_line(line, &r, resolved, targv);
    fail("lost the dispatcher");
}
