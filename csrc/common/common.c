/* What arv-wrap-client and arv-wrap-helper share (common.h). */
#include "common.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>

int stderr_open = 1;

void say_parts(const char *const *parts)
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

int exec_status(int err)
{
    return err == ENOENT ? 127 : 126;
}

void buf_reserve(struct buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return;
    size_t cap = 2 * b->cap + more;
    char *p = b->fixed ? malloc(cap) : realloc(b->p, cap);
    if (!p)
        fail("out of memory");
    if (b->fixed)
        memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
    b->fixed = 0;
}

void buf_release(struct buf *b)
{
    if (!b->fixed)
        free(b->p);
    *b = (struct buf){0};
}

void buf_add(struct buf *b, const void *data, size_t len)
{
    buf_reserve(b, len);
    memcpy(b->p + b->len, data, len);
    b->len += len;
}

void put_str(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s) + 1);
}

/* dst = a + "/" + b as os.path.join does it (no doubled slash). */
int join(char *dst, size_t cap, const char *a, const char *b)
{
    size_t la = strlen(a);
    const char *sep = (la && a[la - 1] == '/') ? "" : "/";
    int n = snprintf(dst, cap, "%s%s%s", a, sep, b);
    return n >= 0 && (size_t)n < cap;
}

/* os.path.abspath: relative to the cwd, then normpath (., .., //). */
int abspath(char *dst, size_t cap, const char *path)
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

long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

ssize_t read_full(int fd, void *p, size_t len)
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

ssize_t write_full(int fd, const void *p, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = send(fd, (const char *)p + done, len - done, MSG_NOSIGNAL);
        if (n < 0 && errno == ENOTSOCK)
            n = write(fd, (const char *)p + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        done += n;
    }
    return done;
}
