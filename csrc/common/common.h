/* What arv-wrap-client and arv-wrap-helper share: one-line messages, a growable
 * buffer, path helpers and clocks. */
#ifndef ARVWRAP_COMMON_H
#define ARVWRAP_COMMON_H

#include <stddef.h>
#include <sys/types.h>

#define STATUS_ARVWRAP 125          /* arv-wrap, not the tool, failed */

extern char **environ;
extern int stderr_open;             /* 0 if the caller closed fd 2: it may become one of ours */

/* One "arv-wrap: <parts...>" line on stderr, in a single write. */
void say_parts(const char *const *parts);
#define say(...) say_parts((const char *const[]){__VA_ARGS__, NULL})
#define fail(...) do { say(__VA_ARGS__); _exit(STATUS_ARVWRAP); } while (0)

_Noreturn void usage(void);          /* each program's own (its main.c) */
int exec_status(int err);           /* what a shell exits with for an exec failing with err */

struct buf {
    char *p;
    size_t len, cap;
    int fixed;                      /* p is the caller's storage: never realloc'd or freed */
};
void buf_reserve(struct buf *b, size_t more);
void buf_release(struct buf *b);
void buf_add(struct buf *b, const void *data, size_t len);
void put_str(struct buf *b, const char *s);      /* s and its NUL */

int join(char *dst, size_t cap, const char *a, const char *b);   /* 0 if too long */
int abspath(char *dst, size_t cap, const char *path);            /* 0 if too long */

long long now_ns(void);
ssize_t read_full(int fd, void *p, size_t len);
ssize_t write_full(int fd, const void *p, size_t len);           /* MSG_NOSIGNAL on sockets */

#endif
