/*
 * arv-wrap-client: the program the shim execs in place of a whitelisted tool.
 *
 *   arv-wrap-client --shim IDX RESOLVED [ARGV...]   hand the call to the dispatcher
 *   arv-wrap-client --exec CMD [ARGS...]            execvp(CMD) (the shim hooks it)
 *   arv-wrap-client --relay ARGV0 PATH [ARGS...]     a Slurm task on the node (below)
 *   arv-wrap-client --launch PPID [-u UMASK] [-l RES:SOFT:HARD]... -- PATH [ARGS...]
 *                                                    start srun for the Slurm backend
 *
 * --relay (srun runs it on the node, src/arvwrap/backends/slurm.py): connects fd 1
 * and then fd 2 to ARV_WRAP_SLURM_HOST:ARV_WRAP_SLURM_PORT, each connection opened
 * with "o<token>\n" / "e<token>\n" (ARV_WRAP_SLURM_TOKEN); gives PWD, SHLVL,
 * ARV_WRAP_DISABLE and BASH_ENV back the caller's values (ARV_WRAP_SLURM_<NAME> is
 * "=value", or absent when the caller had none; BASH_ENV is left alone when absent),
 * removes every ARV_WRAP_SLURM_* variable, and execs PATH with argv ARGV0 ARGS... by a
 * raw execve syscall. Its own failures: one "arv-wrap-relay: ..." line on the stderr
 * it was given (srun's, read by the backend), status 125 (126/127 for an exec failure,
 * also reported as "arv-wrap: PATH: ..." on the tool's stderr, the caller's).
 * --launch (the dispatcher runs it in front of srun): PR_SET_PDEATHSIG SIGKILL (and
 * exit 125 if the parent PPID is already gone), then each rlimit RES (its number)
 * to SOFT:HARD ("u" for unlimited), then the umask (octal), then a raw execve of PATH.
 *
 * Contract (docs/internals.md, sections 3 and 4):
 *  - To the process that exec'd the tool, this program IS the tool: it exits with
 *    the job's exit status, or dies of the job's signal (no core dump), and writes
 *    nothing to the tool's streams unless arv-wrap itself is the reason for a
 *    failure (then one "arv-wrap: ..." line on stderr, and status 125).
 *  - It hands over everything a local run would have inherited: argv, environ, cwd
 *    (as a path and as an O_PATH handle), umask, every rlimit, fds 0-2 and every
 *    open fd that an argument names as /dev/fd/N or /proc/self/fd/N (SCM_RIGHTS).
 *    The caller's fds are listed before this program opens any of its own, so a
 *    closed caller fd can never be confused with ours.
 *  - SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the
 *    job as "sig N" lines, unless the caller ignored them (then they stay ignored,
 *    as the tool would have them). They are blocked while the request is sent, so
 *    a dispatcher that has read the request knows forwarding is in place.
 *  - "local" runs the tool here by a raw execve syscall (the shim must not
 *    redirect it again); our own descriptors are all close-on-exec, and signal
 *    dispositions and mask are back to what the caller gave us.
 *  - The warm path is lean (it runs per tool call): about 40 cheap syscalls, one
 *    sendmsg for the whole request. The cold start (no dispatcher yet) starts one
 *    under a flock so that concurrent clients start only one.
 *  - All writes to the socket use MSG_NOSIGNAL (a dead dispatcher means status
 *    125 or a signal forwarded to nobody, never a SIGPIPE death), and every
 *    blocking call is retried on EINTR.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netdb.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>

#define STATUS_ARVWRAP 125          /* arv-wrap, not the tool, failed */
#define MAX_FDS 253                 /* SCM_MAX_FD: the kernel's limit per message */
#define HEADER_LEN 12               /* "AWR1" + little-endian u64 payload length */
#define START_TIMEOUT_NS (20LL * 1000000000)
#define RETRY_MS 2

extern char **environ;

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define N_FORWARDED (int)(sizeof forwarded / sizeof forwarded[0])

static int sock_fd = -1;            /* the dispatcher connection, for the signal handler */
static int stderr_open = 1;         /* 0 if the caller closed fd 2: it may become one of ours */

/* ---------------------------------------------------------------- messages */

/* One "arv-wrap: <parts...>" line on stderr, in a single write. */
static void say_parts(const char *const *parts)
{
    struct iovec v[8] = {{"arv-wrap: ", 10}};
    int n = 1;
    for (; *parts && n < 7; parts++)
        v[n++] = (struct iovec){(void *)*parts, strlen(*parts)};
    v[n++] = (struct iovec){"\n", 1};
    ssize_t r;
    if (stderr_open)
        do r = writev(2, v, n); while (r < 0 && errno == EINTR);
}

#define say(...) say_parts((const char *const[]){__VA_ARGS__, NULL})
#define fail(...) do { say(__VA_ARGS__); _exit(STATUS_ARVWRAP); } while (0)

static _Noreturn void usage(void)
{
    static const char msg[] = "usage: arv-wrap-client --shim IDX RESOLVED [ARGV...]"
                              " | --exec CMD [ARGS...] | --relay ARGV0 PATH [ARGS...]"
                              " | --launch PPID [-u UMASK] [-l RES:SOFT:HARD]... -- PATH"
                              " [ARGS...]\n";
    ssize_t n = write(2, msg, sizeof msg - 1);
    (void)n;
    _exit(2);
}

/* Exit status a shell gives for an exec that failed with err. */
static int exec_status(int err)
{
    return err == ENOENT ? 127 : 126;
}

/* ---------------------------------------------------------------- growable buffer */

struct buf {
    char *p;
    size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return;
    size_t cap = 2 * b->cap + more;
    char *p = realloc(b->p, cap);
    if (!p)
        fail("out of memory");
    b->p = p;
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *data, size_t len)
{
    buf_reserve(b, len);
    memcpy(b->p + b->len, data, len);
    b->len += len;
}

static void put_str(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s) + 1);
}

/* A payload field: tag, bytes, NUL. */
static void put_field(struct buf *b, char tag, const char *s)
{
    buf_add(b, &tag, 1);
    put_str(b, s);
}

static void put_number(struct buf *b, char tag, long long n)
{
    char s[24];
    snprintf(s, sizeof s, "%lld", n);
    put_field(b, tag, s);
}

/* ---------------------------------------------------------------- paths */

/* dst = a + "/" + b as os.path.join does it (no doubled slash); 0 if too long. */
static int join(char *dst, size_t cap, const char *a, const char *b)
{
    size_t la = strlen(a);
    const char *sep = (la && a[la - 1] == '/') ? "" : "/";
    int n = snprintf(dst, cap, "%s%s%s", a, sep, b);
    return n >= 0 && (size_t)n < cap;
}

/* os.path.abspath: relative to the cwd, then normpath (., .., //). 0 if too long. */
static int abspath(char *dst, size_t cap, const char *path)
{
    char tmp[2 * PATH_MAX], cwd[PATH_MAX];
    if (path[0] != '/') {
        if (!getcwd(cwd, sizeof cwd) || !join(tmp, sizeof tmp, cwd, path))
            return 0;
    } else if (snprintf(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp) {
        return 0;
    }
    size_t slashes = strspn(tmp, "/"), root = slashes == 2 ? 2 : 1, len = root;
    if (cap <= root)
        return 0;
    memcpy(dst, "//", root);
    for (char *save, *part = strtok_r(tmp, "/", &save); part; part = strtok_r(NULL, "/", &save)) {
        if (!strcmp(part, "."))
            continue;
        if (!strcmp(part, "..")) {          /* drop the last component, never the root */
            while (len > root && dst[len - 1] != '/')
                len--;
            if (len > root)
                len--;
            continue;
        }
        size_t lp = strlen(part), sep = len > root;
        if (len + sep + lp + 1 > cap)
            return 0;
        if (sep)
            dst[len++] = '/';
        memcpy(dst + len, part, lp);
        len += lp;
    }
    dst[len] = 0;
    return 1;
}

/* The state dir exactly as arvwrap.paths.state_dir computes it. */
static void state_dir(char *dst, size_t cap)
{
    const char *v = getenv("ARV_WRAP_STATE_DIR");
    int ok;
    if (v && *v) {
        ok = abspath(dst, cap, v);
    } else if ((v = getenv("XDG_STATE_HOME")) && *v) {
        ok = join(dst, cap, v, "arv-wrap");
    } else {
        char home[PATH_MAX];
        v = getenv("HOME");
        if (!v || !*v) {                    /* os.path.expanduser("~") */
            struct passwd *pw = getpwuid(getuid());
            snprintf(home, sizeof home, "%s", pw ? pw->pw_dir : "");
            for (size_t n = strlen(home); n > 0 && home[n - 1] == '/'; n--)
                home[n - 1] = 0;
            v = *home ? home : "/";
        }
        ok = join(dst, cap, v, ".local/state/arv-wrap");
    }
    if (!ok)
        fail("the state dir path is too long");
}

/* <runtime>/<fnv1a64(state)>.sock, and the runtime dir itself. */
static void socket_path(char *sock, size_t cap, char *runtime, size_t rcap, const char *state)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int ok = xdg && *xdg ? join(runtime, rcap, xdg, "arv-wrap")
                         : snprintf(runtime, rcap, "/tmp/arv-wrap-%u", (unsigned)getuid()) > 0;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *s = (const unsigned char *)state; *s; s++)
        h = (h ^ *s) * 0x100000001b3ULL;
    char name[32];
    snprintf(name, sizeof name, "%016llx.sock", (unsigned long long)h);
    if (!ok || !join(sock, cap, runtime, name))
        fail("the socket path is too long: ", runtime);
}

/* 0 if dir is ours and 0700-private; -1 with errno (ENOENT if missing) otherwise. */
static int check_private(const char *dir)
{
    struct stat st;
    if (stat(dir, &st) < 0)
        return -1;
    if (!S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 077))
        fail("refusing ", dir, ": it must be a directory owned by this user, mode 0700");
    return 0;
}

/* mkdir -p dir (0700), then check it. */
static void make_private(const char *dir)
{
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1;; s++) {
        if (*s == '/' || !*s) {
            char c = *s;
            *s = 0;
            if (mkdir(p, 0700) < 0 && errno != EEXIST)
                fail("cannot create ", p, ": ", strerror(errno));
            *s = c;
            if (!c)
                break;
        }
    }
    if (check_private(dir) < 0)
        fail("cannot use ", dir, ": ", strerror(errno));
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

/* ---------------------------------------------------------------- the request */

struct fdlist {
    int n;
    int caller[MAX_FDS];             /* caller's fd number; -1 for the cwd handle */
    int fd[MAX_FDS];                 /* what goes into SCM_RIGHTS */
};

static int is_open(int fd)
{
    return fcntl(fd, F_GETFD) != -1;
}

static void add_caller_fd(struct fdlist *l, long fd)
{
    if (fd > INT_MAX || l->n >= MAX_FDS)
        return;
    for (int i = 0; i < l->n; i++)
        if (l->caller[i] == fd)
            return;
    if (!is_open((int)fd))
        return;
    l->caller[l->n] = l->fd[l->n] = (int)fd;
    l->n++;
}

/* Every N in "<prefix>N" anywhere in arg. */
static void scan_arg(struct fdlist *l, const char *arg, const char *prefix)
{
    size_t plen = strlen(prefix);
    for (const char *p = strstr(arg, prefix); p; p = strstr(p, prefix)) {
        p += plen;
        long fd = 0;
        int digits = 0;
        for (; *p >= '0' && *p <= '9' && digits < 10; p++, digits++)
            fd = fd * 10 + (*p - '0');
        if (digits)
            add_caller_fd(l, fd);
    }
}

/* cwd first, then fds 0-2, then the fds argv names. Called before we open anything. */
static void collect_fds(struct fdlist *l, char **targv)
{
    l->n = 1;                         /* slot 0: the cwd handle, opened afterwards */
    l->caller[0] = -1;
    for (int fd = 0; fd < 3; fd++)
        add_caller_fd(l, fd);
    stderr_open = l->caller[l->n - 1] == 2;
    for (char **a = targv; *a; a++) {
        if (!strchr(*a, '/'))
            continue;
        scan_arg(l, *a, "/dev/fd/");
        scan_arg(l, *a, "/proc/self/fd/");
    }
    do l->fd[0] = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    while (l->fd[0] < 0 && errno == EINTR);
    if (l->fd[0] < 0) {               /* no handle: drop the slot */
        l->n--;
        memmove(l->caller, l->caller + 1, l->n * sizeof(int));
        memmove(l->fd, l->fd + 1, l->n * sizeof(int));
    }
}

static void put_rlimits(struct buf *b)
{
    for (int r = 0; r < RLIMIT_NLIMITS; r++) {
        struct rlimit rl;
        char s[64], soft[24], hard[24];
        if (getrlimit(r, &rl) < 0)
            continue;
        snprintf(soft, sizeof soft, "%llu", (unsigned long long)rl.rlim_cur);
        snprintf(hard, sizeof hard, "%llu", (unsigned long long)rl.rlim_max);
        snprintf(s, sizeof s, "%d %s %s", r, rl.rlim_cur == RLIM_INFINITY ? "inf" : soft,
                 rl.rlim_max == RLIM_INFINITY ? "inf" : hard);
        put_field(b, 'L', s);
    }
}

static void build_request(struct buf *b, const char *idx, const char *resolved,
                          char **targv, const struct fdlist *l)
{
    char cwd[PATH_MAX];
    size_t size = 4096;
    for (char **a = targv; *a; a++)
        size += strlen(*a) + 2;
    for (char **e = environ; *e; e++)
        size += strlen(*e) + 2;
    buf_reserve(b, size);
    b->len = HEADER_LEN;
    put_field(b, 'R', idx);
    put_field(b, 'P', resolved);
    for (char **a = targv; *a; a++)
        put_field(b, 'A', *a);
    for (char **e = environ; *e; e++)
        put_field(b, 'E', *e);
    put_field(b, 'C', getcwd(cwd, sizeof cwd) ? cwd : "");
    mode_t mask = umask(0);
    umask(mask);
    put_number(b, 'U', mask);
    put_rlimits(b);
    for (int i = 0; i < l->n; i++) {
        if (l->caller[i] < 0)
            put_field(b, 'F', "cwd");
        else
            put_number(b, 'F', l->caller[i]);
    }
    put_number(b, 'I', getpid());
    uint64_t len = b->len - HEADER_LEN;
    memcpy(b->p, "AWR1", 4);
    for (int i = 0; i < 8; i++)
        b->p[4 + i] = (char)(len >> (8 * i));
}

/* One sendmsg carries the header, the fds, and (usually) the whole payload. */
static void send_request(int fd, const struct buf *b, const struct fdlist *l)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {b->p, b->len};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (l->n) {
        m.msg_control = ctl.buf;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * l->n);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * l->n);
        memcpy(CMSG_DATA(c), l->fd, sizeof(int) * l->n);
    }
    size_t done = 0;
    while (done < b->len) {
        ssize_t n = done ? send(fd, b->p + done, b->len - done, MSG_NOSIGNAL)
                         : sendmsg(fd, &m, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("cannot send the call to the dispatcher: ", strerror(errno));
        done += n;
    }
}

/* ---------------------------------------------------------------- connecting */

/* A connected socket, or -1 with errno from connect. */
static int try_connect(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, path);                      /* length checked by the caller */
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            fail("cannot create a socket: ", strerror(errno));
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0)
            return fd;
        int err = errno;
        close(fd);
        errno = err;
        if (err != EINTR)
            return -1;
    }
}

/* LD_PRELOAD's value without the shim (entries split on ' ' or ':'); "" if none left. */
static char *preload_without_shim(const char *value)
{
    const char *shim = getenv("ARV_WRAP_SHIM");
    char *out = calloc(1, strlen(value) + 1), *copy = strdup(value), *save;
    if (!out || !copy)
        _exit(1);
    for (char *e = strtok_r(copy, " :", &save); e; e = strtok_r(NULL, " :", &save)) {
        const char *base = strrchr(e, '/');
        if ((shim && !strcmp(e, shim)) || !strcmp(base ? base + 1 : e, "libarvwrap.so"))
            continue;
        if (*out)
            strcat(out, ":");
        strcat(out, e);
    }
    return out;
}

static char **daemon_environ(void)
{
    size_t n = 0, j = 0;
    while (environ[n])
        n++;
    char **env = calloc(n + 1, sizeof *env);
    if (!env)
        _exit(1);
    for (size_t i = 0; i < n; i++) {
        if (strncmp(environ[i], "LD_PRELOAD=", 11)) {
            env[j++] = environ[i];
            continue;
        }
        char *rest = preload_without_shim(environ[i] + 11), *e;
        if (*rest && asprintf(&e, "LD_PRELOAD=%s", rest) > 0)
            env[j++] = e;
    }
    return env;
}

static const char *python(void)
{
    const char *py = getenv("ARV_WRAP_PYTHON");
    return py && *py ? py : "python3";
}

/* execvpe by raw syscalls, so the shim loaded in us does not redirect python. */
static void exec_search(const char *file, char **argv, char **envp)
{
    if (strchr(file, '/')) {
        syscall(SYS_execve, file, argv, envp);
        return;
    }
    const char *path = getenv("PATH");
    char *dirs = strdup(path && *path ? path : "/bin:/usr/bin"), *save, full[PATH_MAX];
    int err = ENOENT;
    for (char *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        if (!join(full, sizeof full, d, file))
            continue;
        syscall(SYS_execve, full, argv, envp);
        if (errno == EACCES)
            err = EACCES;
        else if (errno != ENOENT && errno != ENOTDIR)
            return;
    }
    errno = err;
}

/* Close every fd >= 3 but keep. */
static void close_others(int keep)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, 3, keep - 1, 0) == 0
        && syscall(SYS_close_range, keep + 1, ~0U, 0) == 0)
        return;
#endif
    struct rlimit rl;
    long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (1 << 20) ? (long)rl.rlim_cur
                                                                              : 1 << 20;
    for (long fd = 3; fd < max; fd++)
        if (fd != keep)
            close((int)fd);
}

/* In the grandchild: a clean daemon, then the dispatcher. Reports to fd w:
 * first its pid, then errno if the exec fails. */
static _Noreturn void exec_dispatcher(int w, const char *sock, const char *state)
{
    pid_t me = getpid();
    if (write(w, &me, sizeof me) != sizeof me)
        _exit(1);
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &dfl, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int null = open("/dev/null", O_RDWR);
    for (int fd = 0; fd < 3; fd++)
        dup2(null, fd);
    close_others(w);
    if (chdir("/") < 0)
        _exit(1);
    char *argv[] = {(char *)python(), "-m", "arvwrap.dispatcher",
                    "--socket", (char *)sock, "--state-dir", (char *)state, NULL};
    exec_search(argv[0], argv, daemon_environ());
    int err = errno;
    ssize_t n = write(w, &err, sizeof err);
    (void)n;
    _exit(127);
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static ssize_t read_full(int fd, void *p, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = read(fd, (char *)p + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        done += n;
    }
    return done;
}

/* Read the daemon's pipe (only when that cannot block): an errno means its exec
 * failed; EOF means it worked (the pipe is close-on-exec), so close it: -1. */
static int exec_report(int fd)
{
    int err;
    if (read_full(fd, &err, sizeof err) == sizeof err)
        fail("cannot run ", python(), ": ", strerror(err));
    close(fd);
    return -1;
}

/* Double-fork the dispatcher, then connect every 2 ms for up to 20 s. Fails fast
 * if it cannot be exec'd or exits before it listens. */
static int start_dispatcher(const char *sock, const char *state)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        fail("cannot start the dispatcher: ", strerror(errno));
    pid_t child = fork();
    if (child < 0)
        fail("cannot start the dispatcher: ", strerror(errno));
    if (child == 0) {
        int w = fcntl(p[1], F_DUPFD_CLOEXEC, 3);   /* clear of 0-2, which become /dev/null */
        if (w < 0 || setsid() < 0)
            _exit(1);
        pid_t g = fork();
        if (g == 0)
            exec_dispatcher(w, sock, state);
        _exit(g < 0);
    }
    close(p[1]);
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
        ;
    pid_t daemon;
    if (read_full(p[0], &daemon, sizeof daemon) != sizeof daemon)
        fail("cannot start the dispatcher (fork failed)");
    struct pollfd pf = {.fd = p[0], .events = POLLIN};
    for (long long deadline = now_ns() + START_TIMEOUT_NS; now_ns() < deadline;) {
        int fd = try_connect(sock);
        if (fd >= 0) {
            if (pf.fd >= 0)
                close(pf.fd);
            return fd;
        }
        if (poll(&pf, pf.fd >= 0, RETRY_MS) > 0)
            pf.fd = exec_report(pf.fd);
        if (kill(daemon, 0) < 0 && errno == ESRCH) {
            if (pf.fd >= 0)
                exec_report(pf.fd);                 /* a failed exec says why */
            if ((fd = try_connect(sock)) >= 0)      /* it left to one already there */
                return fd;
            fail("the dispatcher (", python(), " -m arvwrap.dispatcher) exited before it listened");
        }
    }
    fail("the dispatcher did not listen on ", sock, " within 20 s");
}

static int connect_dispatcher(void)
{
    char state[PATH_MAX], runtime[PATH_MAX], sock[PATH_MAX], lock[PATH_MAX + 8];
    state_dir(state, sizeof state);
    socket_path(sock, sizeof sock, runtime, sizeof runtime, state);
    if (strlen(sock) >= sizeof((struct sockaddr_un *)0)->sun_path)
        fail("the socket path is too long: ", sock);
    int fd;
    if (check_private(runtime) == 0) {
        if ((fd = try_connect(sock)) >= 0)
            return fd;
        if (errno != ENOENT && errno != ECONNREFUSED)
            fail("cannot connect to ", sock, ": ", strerror(errno));
    } else if (errno != ENOENT) {
        fail("cannot use ", runtime, ": ", strerror(errno));
    }
    /* cold start, serialised by the lock file */
    make_private(runtime);
    snprintf(lock, sizeof lock, "%.*s.lock", (int)(strlen(sock) - 5), sock);
    int lk;
    do lk = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    while (lk < 0 && errno == EINTR);
    if (lk < 0)
        fail(lock, ": ", strerror(errno));
    while (flock(lk, LOCK_EX) < 0)
        if (errno != EINTR)
            fail(lock, ": ", strerror(errno));
    fd = try_connect(sock);
    if (fd < 0) {
        unlink(sock);
        fd = start_dispatcher(sock, state);
    }
    close(lk);                                      /* unlocks */
    return fd;
}

/* ---------------------------------------------------------------- signals */

static void forward(int sig)
{
    int saved = errno;
    char msg[16] = "sig ", digits[8];
    int n = 0, len = 4;
    do digits[n++] = (char)('0' + sig % 10); while ((sig /= 10) && n < 8);
    while (n)
        msg[len++] = digits[--n];
    msg[len++] = '\n';
    ssize_t r;
    do r = send(sock_fd, msg, len, MSG_NOSIGNAL); while (r < 0 && errno == EINTR);
    errno = saved;
}

/* Block the forwarded signals (old mask saved) and install the forwarders,
 * leaving ignored signals ignored. */
static void start_forwarding(sigset_t *old)
{
    struct sigaction sa = {.sa_handler = forward, .sa_flags = SA_RESTART}, prev;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < N_FORWARDED; i++)
        sigaddset(&sa.sa_mask, forwarded[i]);
    sigprocmask(SIG_BLOCK, &sa.sa_mask, old);
    for (int i = 0; i < N_FORWARDED; i++)
        if (sigaction(forwarded[i], &sa, &prev) == 0 && prev.sa_handler == SIG_IGN)
            sigaction(forwarded[i], &prev, NULL);
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

/* ---------------------------------------------------------------- replies */

/* s as a decimal in [lo, hi], up to end or a space; -1 if not. */
static int parse_int(const char *s, int lo, int hi, const char **end)
{
    long v = 0;
    const char *p = s;
    for (; *p >= '0' && *p <= '9' && p - s < 10; p++)
        v = v * 10 + (*p - '0');
    if (p == s || (*p && *p != ' ') || v < lo || v > hi)
        return -1;
    *end = p;
    return (int)v;
}

/* "word" or "word ..."; returns the text after the space (or ""), NULL if no match. */
static const char *reply_is(const char *line, const char *word)
{
    size_t n = strlen(word);
    if (strncmp(line, word, n) || (line[n] && line[n] != ' '))
        return NULL;
    return line[n] ? line + n + 1 : line + n;
}

static void handle_line(const char *line, const char *resolved, char **targv)
{
    const char *arg, *end;
    int n;
    if ((arg = reply_is(line, "warn"))) {
        say(arg);
    } else if ((arg = reply_is(line, "job"))) {
        /* informational */
    } else if (reply_is(line, "local")) {
        syscall(SYS_execve, resolved, targv, environ);
        int err = errno;
        say(resolved, ": ", strerror(err));
        _exit(exec_status(err));
    } else if ((arg = reply_is(line, "exit"))) {
        if ((n = parse_int(arg, 0, 255, &end)) < 0 || *end)
            fail("bad reply from the dispatcher: ", line);
        _exit(n);
    } else if ((arg = reply_is(line, "signal"))) {
        if ((n = parse_int(arg, 1, NSIG - 1, &end)) < 0)
            fail("bad reply from the dispatcher: ", line);
        if (*end)
            say(end + 1);
        die_of_signal(n);
    } else if ((arg = reply_is(line, "fail"))) {
        fail(arg);
    }
    /* anything else: a newer dispatcher's informational line; ignore it */
}

static _Noreturn void await_replies(const char *resolved, char **targv)
{
    static char buf[65536];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(sock_fd, buf + len, sizeof buf - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != ECONNRESET)
            fail("reading from the dispatcher: ", strerror(errno));
        if (n <= 0)
            fail("lost the dispatcher");
        len += n;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', buf + len - start))) {
            *nl = 0;
            handle_line(start, resolved, targv);
            start = nl + 1;
        }
        len -= start - buf;
        memmove(buf, start, len);
        if (len == sizeof buf - 1) {                /* an over-long line: take it as is */
            buf[len] = 0;
            handle_line(buf, resolved, targv);
            len = 0;
        }
    }
}

/* ---------------------------------------------------------------- modes */

static int is_decimal(const char *s)
{
    size_t n = strspn(s, "0123456789");
    return n > 0 && n < 10 && !s[n];
}

static _Noreturn void run_shim(const char *idx, const char *resolved, char **targv)
{
    if (!is_decimal(idx))
        usage();
    const char *probe_file = getenv("ARV_WRAP_PROBE");
    if (probe_file && *probe_file)
        _exit(probe(probe_file, idx, resolved, targv));
    struct fdlist fds;
    collect_fds(&fds, targv);                       /* before we open anything else */
    struct buf req = {0};
    build_request(&req, idx, resolved, targv, &fds);
    sock_fd = connect_dispatcher();
    sigset_t old;
    start_forwarding(&old);
    send_request(sock_fd, &req, &fds);
    sigprocmask(SIG_SETMASK, &old, NULL);           /* pending signals get forwarded now */
    await_replies(resolved, targv);
}

static _Noreturn void run_exec(char **cmd)
{
    execvp(cmd[0], cmd);
    int err = errno;
    say(cmd[0], ": ", strerror(err));
    _exit(exec_status(err));
}

/* ---------------------------------------------------------------- slurm: --relay, --launch */

static int relay_err = 2;           /* srun's stderr, kept after fd 2 becomes the stream */

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

static int connect_retrying(int s, const struct sockaddr *addr, socklen_t len)
{
    if (connect(s, addr, len) == 0)
        return 0;
    if (errno != EINTR && errno != EINPROGRESS)
        return -1;
    struct pollfd p = {s, POLLOUT, 0};      /* interrupted: the connect goes on; wait for it */
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR)
            return -1;
    int err = 0;
    socklen_t el = sizeof err;
    if (getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
        return -1;
    errno = err;
    return err ? -1 : 0;
}

/* Connect a stream to the dispatcher, send "<kind><token>\n", make it fd target. */
static void relay_stream(const char *host, const char *port, char kind, const char *token,
                         int target)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc)
        relay_fail(STATUS_ARVWRAP, "cannot connect to ", host, rc == EAI_SYSTEM
                   ? strerror(errno) : gai_strerror(rc));
    int s = -1, err = 0;
    for (ai = res; ai; ai = ai->ai_next) {
        s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (s >= 0 && connect_retrying(s, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        err = errno;
        if (s >= 0)
            close(s);
        s = -1;
    }
    freeaddrinfo(res);
    if (s < 0) {
        char where[300];
        snprintf(where, sizeof where, "%s:%s: ", host, port);
        relay_fail(STATUS_ARVWRAP, "cannot connect to ", where, strerror(err));
    }
    size_t tl = strlen(token);
    char *line = malloc(tl + 2);
    if (!line)
        relay_fail(STATUS_ARVWRAP, "out of memory", NULL, NULL);
    line[0] = kind;
    memcpy(line + 1, token, tl);
    line[tl + 1] = '\n';
    for (size_t off = 0; off < tl + 2;) {
        ssize_t n = send(s, line + off, tl + 2 - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            relay_fail(STATUS_ARVWRAP, "cannot send the token: ", strerror(errno), NULL);
        off += n;
    }
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

static _Noreturn void run_relay(const char *argv0, const char *path, char **args)
{
    const char *host = getenv("ARV_WRAP_SLURM_HOST"), *port = getenv("ARV_WRAP_SLURM_PORT");
    const char *token = getenv("ARV_WRAP_SLURM_TOKEN");
    if (!host || !*host || !port || !*port || !token || !*token)
        relay_fail(STATUS_ARVWRAP, "ARV_WRAP_SLURM_HOST, _PORT or _TOKEN is not set", NULL, NULL);
    relay_err = fcntl(2, F_DUPFD_CLOEXEC, 3);
    if (relay_err < 0)
        relay_err = 2;
    relay_stream(host, port, 'o', token, 1);
    relay_stream(host, port, 'e', token, 2);
    restore_var("PWD", "ARV_WRAP_SLURM_PWD", 1);
    restore_var("SHLVL", "ARV_WRAP_SLURM_SHLVL", 1);
    restore_var("ARV_WRAP_DISABLE", "ARV_WRAP_SLURM_DISABLE", 1);
    restore_var("BASH_ENV", "ARV_WRAP_SLURM_BASH_ENV", 0);
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
    args[-1] = (char *)argv0;                       /* argv: ARGV0 ARGS... */
    syscall(SYS_execve, path, args - 1, environ);
    int err = errno;
    say(path, ": ", strerror(err));                 /* the caller sees it on its stderr */
    relay_fail(exec_status(err), path, ": ", strerror(err));
}

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

static _Noreturn void run_launch(int argc, char **argv)
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
