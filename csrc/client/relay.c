/* The Slurm backend's relay (src/arvwrap/backends/slurm.py).
 *
 * --relay ARGV0 PATH ARGS... (srun runs it on the node): connects fd 1 and then
 * fd 2 to ARV_WRAP_SLURM_HOST:ARV_WRAP_SLURM_PORT, each connection opened with
 * "o<token>\n" / "e<token>\n" (ARV_WRAP_SLURM_TOKEN); gives PWD, SHLVL,
 * ARV_WRAP_DISABLE and BASH_ENV back the caller's values (ARV_WRAP_SLURM_<NAME> is
 * "=value", or absent when the caller had none; BASH_ENV is left alone when
 * absent), removes every ARV_WRAP_SLURM_* variable, and execs PATH with argv
 * ARGV0 ARGS... by a raw execve syscall. Its own failures: one "arv-wrap-relay: ..."
 * line on the stderr it was given (srun's, read by the backend), status 125
 * (126/127 for an exec failure, also reported as "arv-wrap: PATH: ..." on the
 * tool's stderr, the caller's).
 */
#include "slurm_helpers.h"
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>

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

_Noreturn void run_relay(const char *argv0, const char *path, char **args)
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

