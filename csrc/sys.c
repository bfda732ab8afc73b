/* The libc string functions the shim defines itself (csrc/sys.h has the rest
 * of its system layer).
 *
 * They carry libc's names but are hidden: every call in the shim, in env.c and in
 * match.c (and any the compiler emits) binds to these at link time, so the
 * constructor and the exec hooks never go through the PLT.  A lazily bound libc
 * call costs a symbol lookup in every process the shim is loaded in, and in every
 * fork child that execs, and writes the GOT page there.  The strings involved are
 * short: plain loops do.  (-fno-builtin and -fno-tree-loop-distribute-patterns
 * keep gcc from turning them back into calls.)
 *
 * Only the shim links this file: match.c and env.c are plain C on <string.h>, so
 * Python's copy of the matcher (cffi) and the fuzz targets use the system libc.
 */
#include <stddef.h>
#include <string.h>

#define OWN __attribute__((visibility("hidden")))

OWN void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

OWN void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

OWN int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

OWN size_t strlen(const char *s)
{
    const char *p = s;
    while (*p)
        p++;
    return (size_t)(p - s);
}

OWN size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

OWN char *strchrnul(const char *s, int c)
{
    while (*s && *s != (char)c)
        s++;
    return (char *)s;
}

OWN char *strchr(const char *s, int c)
{
    s = strchrnul(s, c);
    return *s == (char)c ? (char *)s : NULL;
}

OWN char *strrchr(const char *s, int c)
{
    const char *last = NULL;
    do {
        if (*s == (char)c)
            last = s;
    } while (*s++);
    return (char *)last;
}

OWN int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++)
        if (*a != *b || !*a)
            return (unsigned char)*a - (unsigned char)*b;
    return 0;
}

OWN int strcmp(const char *a, const char *b)
{
    for (; *a == *b && *a; a++, b++)
        ;
    return (unsigned char)*a - (unsigned char)*b;
}

OWN size_t strcspn(const char *s, const char *reject)
{
    size_t n = 0;
    for (; s[n]; n++)
        for (const char *r = reject; *r; r++)
            if (s[n] == *r)
                return n;
    return n;
}
