/* Find the dispatcher's socket, or start the dispatcher under a lock (connect.h).
 *
 * Socket: <runtime>/<fnv1a64(state dir)>.sock, <runtime> being $XDG_RUNTIME_DIR/arv-wrap
 * when that directory is ours, else /tmp/arv-wrap-<uid>; both 0700. A cold start
 * takes flock on <...>.lock, double-forks `$ARV_WRAP_PYTHON -m arvwrap.dispatcher`
 * as a clean daemon and waits until it listens; the daemon reports a start-up
 * failure as one line of text on its --report-fd, which becomes our message.
 */
#include "connect.h"
#include "../common/common.h"

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
#include <unistd.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>

#define START_TIMEOUT_NS (20LL * 1000000000)
#define RETRY_MS 2

/* $HOME, else the passwd entry's home, without trailing slashes (os.path.expanduser). */
static const char *home_dir(char *buf, size_t cap)
{
    const char *v = getenv("HOME");
    if (v && *v)
        return v;
    struct passwd *pw = getpwuid(getuid());
    snprintf(buf, cap, "%s", pw ? pw->pw_dir : "");
    for (size_t n = strlen(buf); n > 0 && buf[n - 1] == '/'; n--)
        buf[n - 1] = 0;
    return *buf ? buf : "/";
}

/* The state dir exactly as arvwrap.paths.state_dir computes it. */
static void state_dir(char *dst, size_t cap)
{
    const char *v = getenv("ARV_WRAP_STATE_DIR");
    char home[PATH_MAX];
    int ok;
    if (v && *v)
        ok = abspath(dst, cap, v);
    else if ((v = getenv("XDG_STATE_HOME")) && *v)
        ok = join(dst, cap, v, "arv-wrap");
    else
        ok = join(dst, cap, home_dir(home, sizeof home), ".local/state/arv-wrap");
    if (!ok)
        fail("the state dir path is too long");
}

static int owned_by_me(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && st.st_uid == getuid();
}

/* A state dir that belongs to another uid, or that this uid cannot even look at
 * (the caller changed uid under an activated environment): this uid's own default
 * one instead, or 0 when it has none. */
static int own_state_dir(char *state, size_t cap)
{
    struct stat st;
    if (stat(state, &st) == 0 ? st.st_uid == getuid() : errno == ENOENT)
        return 1;
    struct passwd *pw = getpwuid(getuid());
    char dir[PATH_MAX];
    if (!pw || !pw->pw_dir || !owned_by_me(pw->pw_dir)
        || !join(dir, sizeof dir, pw->pw_dir, ".local/state/arv-wrap") || strlen(dir) >= cap)
        return 0;
    strcpy(state, dir);
    return 1;
}

/* <runtime>/<fnv1a64(state)>.sock, and the runtime dir itself. */
static void socket_path(char *sock, size_t cap, char *runtime, size_t rcap, const char *state)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int ok = xdg && *xdg && owned_by_me(xdg)
                 ? join(runtime, rcap, xdg, "arv-wrap")
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

/* ---------------------------------------------------------------- the daemon */

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

char **environ_without_shim(void)
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

/* In the grandchild: a clean daemon, then the dispatcher. Reports to fd w: first
 * its pid (binary), then one line of text if it cannot start; the dispatcher
 * closes w once it listens. */
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
    char wfd[16];
    snprintf(wfd, sizeof wfd, "%d", w);
    fcntl(w, F_SETFD, 0);                           /* the dispatcher inherits it */
    char *argv[] = {(char *)python(), "-m", "arvwrap.dispatcher", "--socket", (char *)sock,
                    "--state-dir", (char *)state, "--report-fd", wfd, NULL};
    exec_search(argv[0], argv, environ_without_shim());
    dprintf(w, "cannot run %s: %s\n", python(), strerror(errno));
    _exit(127);
}

/* Double-fork the dispatcher, then connect every 2 ms for up to 20 s. Fails fast,
 * with the daemon's own words, when it cannot start. */
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
    char report[512];
    size_t said = 0;
    struct pollfd pf = {.fd = p[0], .events = POLLIN};
    for (long long deadline = now_ns() + START_TIMEOUT_NS; now_ns() < deadline;) {
        int fd = try_connect(sock);
        if (fd >= 0) {
            if (pf.fd >= 0)
                close(pf.fd);
            return fd;
        }
        if (poll(&pf, pf.fd >= 0, RETRY_MS) > 0) {
            ssize_t n = read(pf.fd, report + said, sizeof report - 1 - said);
            if (n > 0)
                said += n;
            else if (n == 0 || errno != EINTR)
                pf.fd = (close(pf.fd), -1);
        }
        if (pf.fd < 0 && said) {                    /* the daemon said why and left */
            report[said] = 0;
            report[strcspn(report, "\n")] = 0;
            fail(report);
        }
        if (pf.fd < 0 && kill(daemon, 0) < 0 && errno == ESRCH) {
            if ((fd = try_connect(sock)) >= 0)      /* it left to one already there */
                return fd;
            fail("the dispatcher (", python(), " -m arvwrap.dispatcher) exited before it listened");
        }
    }
    fail("the dispatcher did not listen on ", sock, " within 20 s");
}

int connect_dispatcher(char *why, size_t cap)
{
    char state[PATH_MAX], runtime[PATH_MAX], sock[PATH_MAX], lock[PATH_MAX + 8];
    state_dir(state, sizeof state);
    if (!own_state_dir(state, sizeof state)) {
        snprintf(why, cap, "uid %u may not use the state dir %s and has no usable one of its own",
                 (unsigned)getuid(), state);
        return -1;
    }
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
