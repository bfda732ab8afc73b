/* The shim's system layer: raw syscalls and small string helpers that need no
 * libc (csrc/sys.c has the libc string functions the shim defines itself).
 *
 * Everything here is vfork-safe: no allocation, no locks, no errno change unless
 * said, no call through the PLT.  The helpers are static inline so that each
 * file of the shim (shim.c, env.c) gets its own copy and the fuzz targets
 * (fuzz/) can use them with the system libc.
 */
#ifndef ARVWRAP_SYS_H
#define ARVWRAP_SYS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* raw syscalls                                                          */

/* A raw syscall: the result, or -errno; errno is left alone. */
static inline long raw6(long nr, long a, long b, long c, long d, long e, long f)
{
#if defined(__x86_64__)
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "0"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = nr;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory");
    return x0;
#else
    int save = errno;
    long ret = syscall(nr, a, b, c, d, e, f);
    if (ret == -1)
        ret = -errno;
    errno = save;
    return ret;
#endif
}

#define RAW(nr, a, b, c, d, e) \
    raw6((nr), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* As libc's syscall(): -1 with errno set on failure. */
static inline long sys5(long nr, long a, long b, long c, long d, long e)
{
    long ret = raw6(nr, a, b, c, d, e, 0);
    if (ret < 0 && ret > -4096) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

/* fstatat(2): 0, or -errno; errno is left alone. */
static inline int raw_fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
#ifdef SYS_newfstatat
    return (int)RAW(SYS_newfstatat, dirfd, path, st, flags, 0);
#else
    int save = errno;
    int ret = fstatat(dirfd, path, st, flags) == 0 ? 0 : -errno;
    errno = save;
    return ret;
#endif
}

static inline long sys_execve(const char *path, char *const argv[], char *const envp[])
{
    return sys5(SYS_execve, (long)path, (long)argv, (long)envp, 0, 0);
}

/* ------------------------------------------------------------------ */
/* small helpers (string functions only)                                */


static inline int starts_with(const char *s, const char *prefix)
{
    for (; *prefix; s++, prefix++)
        if (*s != *prefix)
            return 0;
    return 1;
}

/* Length of an environment entry's name (up to '=' or the end). */
static inline size_t name_len(const char *entry)
{
    const char *eq = strchr(entry, '=');
    return eq ? (size_t)(eq - entry) : strlen(entry);
}

/* Value of NAME in env (first entry wins, as getenv), or NULL. */
static inline const char *env_value(char *const *env, const char *name)
{
    size_t n = strlen(name);
    for (; env && *env; env++)
        if (strncmp(*env, name, n) == 0 && (*env)[n] == '=')
            return *env + n + 1;
    return NULL;
}

static inline const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Decimal text of n (>= 0), written at the end of buf; returns where it starts. */
static inline char *decimal(char *buf, size_t size, long n)
{
    char *p = buf + size;
    *--p = '\0';
    do {
        *--p = (char)('0' + n % 10);
        n /= 10;
    } while (n && p > buf);
    return p;
}

/* Append s to buf[*len], bounded by size; returns -1 when it does not fit. */
static inline int append(char *buf, size_t size, size_t *len, const char *s, size_t n)
{
    if (*len + n >= size)
        return -1;
    memcpy(buf + *len, s, n);
    *len += n;
    buf[*len] = '\0';
    return 0;
}

#endif
