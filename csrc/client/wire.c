/* The request and the reply reader (wire.h). */
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>

#define HEADER_LEN 12               /* "AWR1" + little-endian u64 payload length */

/* ---------------------------------------------------------------- descriptors */

static int is_open(int fd)
{
    return fcntl(fd, F_GETFD) != -1;
}

static void add_caller_fd(struct fdlist *l, long fd)
{
    if (fd > INT_MAX || l->n >= MAX_FDS)
        return;
    for (int i = 0; i < l->n; i++)
        if (l->fd[i] == fd)
            return;
    if (!is_open((int)fd))
        return;
    l->fd[l->n++] = (int)fd;
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

void collect_fds(struct fdlist *l, char **targv)
{
    l->n = 0;
    for (int fd = 0; fd < 3; fd++)
        add_caller_fd(l, fd);
    stderr_open = l->n && l->fd[l->n - 1] == 2;
    for (char **a = targv; *a; a++) {
        if (!strchr(*a, '/'))
            continue;
        scan_arg(l, *a, "/dev/fd/");
        scan_arg(l, *a, "/proc/self/fd/");
    }
}

/* ---------------------------------------------------------------- the request */

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

/* The caller's nice and signal state (N, G, B), for a backend that must rebuild them
 * where the tool runs (a Slurm task inherits neither). A signal the client has its
 * own handler for was not ignored by the caller (an ignored one keeps SIG_IGN); the
 * caller's mask is the one the client saved before blocking anything. */
static void put_process_state(struct buf *b, const sigset_t *callers_mask,
                              const sigset_t *handled)
{
    errno = 0;                         /* -1 is a valid nice: only errno tells a failure */
    int nice = getpriority(PRIO_PROCESS, 0);
    if (nice != -1 || !errno)
        put_number(b, 'N', nice);
    unsigned long long ignored = 0, mask = 0;
    for (int sig = 1; sig <= 64 && sig < NSIG; sig++) {     /* bit sig-1 for signal sig */
        struct sigaction old;
        if (sigismember(handled, sig) != 1 && sigaction(sig, NULL, &old) == 0
            && old.sa_handler == SIG_IGN)
            ignored |= 1ULL << (sig - 1);
        if (sigismember(callers_mask, sig) == 1)
            mask |= 1ULL << (sig - 1);
    }
    char s[24];
    snprintf(s, sizeof s, "%llx", ignored);
    put_field(b, 'G', s);
    snprintf(s, sizeof s, "%llx", mask);
    put_field(b, 'B', s);
}

void build_state_line(struct buf *b, const sigset_t *callers_mask, const sigset_t *handled)
{
    b->len = 0;
    buf_add(b, "state ", 6);
    put_rlimits(b);
    put_process_state(b, callers_mask, handled);
    buf_add(b, "\n", 1);
}

void build_request(struct buf *b, const char *idx, const char *resolved, char **targv,
                   const struct fdlist *l)
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
    for (int i = 0; i < l->n; i++)
        put_number(b, 'F', l->fd[i]);
    put_number(b, 'I', getpid());
    uint64_t len = b->len - HEADER_LEN;
    memcpy(b->p, "AWR1", 4);
    for (int i = 0; i < 8; i++)
        b->p[4 + i] = (char)(len >> (8 * i));
}

/* One sendmsg carries the header, the fds, and (usually) the whole payload. */
void send_request(int fd, const struct buf *b, const struct fdlist *l)
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

/* ---------------------------------------------------------------- replies */

/* Read more into r; 0 at EOF. */
/* Descriptors sent with a reply (for a "fds" line): kept in arrival order, moved
 * above the standard ones so that putting them in place cannot clobber another. */
static void keep_fds(struct reader *r, struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            int high = fcntl(fd, F_DUPFD_CLOEXEC, 10);
            close(fd);
            if (high >= 0 && r->nfds < READER_FDS)
                r->fds[r->nfds++] = high;
            else if (high >= 0)
                close(high);
        }
    }
}

static int fill(struct reader *r)
{
    if (r->start) {
        memmove(r->buf, r->buf + r->start, r->len - r->start);
        r->len -= r->start;
        r->start = 0;
    }
    for (;;) {
        struct iovec iov = {r->buf + r->len, sizeof r->buf - 1 - r->len};
        union { struct cmsghdr h; char space[CMSG_SPACE(sizeof(int) * READER_FDS)]; } control;
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = &control, .msg_controllen = sizeof control};
        ssize_t n = recvmsg(r->fd, &msg, MSG_CMSG_CLOEXEC);
        if (n > 0)
            keep_fds(r, &msg);
        else if (n < 0 && errno == ENOTSOCK)    /* a file (the reply fuzzer's memfd) */
            n = read(r->fd, iov.iov_base, iov.iov_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != ECONNRESET)
            fail("reading from the dispatcher: ", strerror(errno));
        if (n <= 0)
            return 0;
        r->len += n;
        return 1;
    }
}

char *read_line(struct reader *r)
{
    for (;;) {
        char *line = r->buf + r->start, *nl = memchr(line, '\n', r->len - r->start);
        if (nl) {
            *nl = 0;
            r->start = nl + 1 - r->buf;
            return line;
        }
        if (r->len - r->start == sizeof r->buf - 1) {   /* an over-long line: take it as is */
            r->buf[r->len] = 0;
            r->start = r->len;
            return line;
        }
        if (!fill(r))
            return NULL;
    }
}

static char block_space[1 << 16];     /* the usual block: no malloc (and its mmaps) */

void release_block(char *block)
{
    if (block != block_space)
        free(block);
}

char *read_block(struct reader *r, size_t n)
{
    char *out = n < sizeof block_space ? block_space : malloc(n + 1);
    if (!out)
        fail("out of memory");
    size_t got = 0;
    while (got < n) {
        if (r->start == r->len && !fill(r)) {
            release_block(out);
            return NULL;
        }
        size_t take = r->len - r->start < n - got ? r->len - r->start : n - got;
        memcpy(out + got, r->buf + r->start, take);
        r->start += take;
        got += take;
    }
    out[n] = 0;
    return out;
}

const char *reply_is(const char *line, const char *word)
{
    size_t n = strlen(word);
    if (strncmp(line, word, n) || (line[n] && line[n] != ' '))
        return NULL;
    return line[n] ? line + n + 1 : line + n;
}

long long parse_number(const char *s, long long lo, long long hi, const char **end)
{
    long long v = 0;
    const char *p = s;
    for (; *p >= '0' && *p <= '9' && p - s < 18; p++)
        v = v * 10 + (*p - '0');
    if (p == s || (*p && *p != ' ') || v < lo || v > hi)
        return -1;
    *end = p;
    return v;
}
