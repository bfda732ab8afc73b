/* A preloaded library with one deliberate bug, built like the sanitized shim
 * (tests/test_sanitized.py): proves that a finding in a preloaded library is
 * reported and logged where the test looks, even under env -i. */
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) static int overflow(int i)
{
    char buf[8], *p = buf;
    memset(buf, 'x', sizeof buf);
    return p[i];                    /* i == 8: one past the end */
}

__attribute__((noinline)) static int shift(int n)
{
    return 1 << n;                  /* n == 40: undefined */
}

__attribute__((constructor)) static void canary(void)
{
    volatile int i = 8, n = 40;
#ifdef CANARY_UBSAN
    exit(shift(n) == 42);
#else
    exit(overflow(i) == 42);
#endif
}
