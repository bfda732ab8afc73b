/* via_execle FILE ARG0 [ARGS...]: execle(FILE, ARG0, ..., NULL, environ).
 * The variadic call needs a fixed count: up to 8 argv elements. */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    const char *f = argv[1];
    char **a = argv + 2;

    switch (argc - 2) {
    case 1: execle(f, a[0], (char *)NULL, environ); break;
    case 2: execle(f, a[0], a[1], (char *)NULL, environ); break;
    case 3: execle(f, a[0], a[1], a[2], (char *)NULL, environ); break;
    case 4: execle(f, a[0], a[1], a[2], a[3], (char *)NULL, environ); break;
    case 5: execle(f, a[0], a[1], a[2], a[3], a[4], (char *)NULL, environ); break;
    case 6: execle(f, a[0], a[1], a[2], a[3], a[4], a[5], (char *)NULL, environ); break;
    case 7: execle(f, a[0], a[1], a[2], a[3], a[4], a[5], a[6], (char *)NULL, environ); break;
    case 8: execle(f, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], (char *)NULL, environ); break;
    default: return 98;
    }
    printf("errno=%d\n", errno);
    return 99;
}
