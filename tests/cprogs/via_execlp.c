/* via_execlp FILE ARG0 [ARGS...]: execlp(FILE, ARG0, ..., NULL) (PATH search).
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
    case 1: execlp(f, a[0], (char *)NULL); break;
    case 2: execlp(f, a[0], a[1], (char *)NULL); break;
    case 3: execlp(f, a[0], a[1], a[2], (char *)NULL); break;
    case 4: execlp(f, a[0], a[1], a[2], a[3], (char *)NULL); break;
    case 5: execlp(f, a[0], a[1], a[2], a[3], a[4], (char *)NULL); break;
    case 6: execlp(f, a[0], a[1], a[2], a[3], a[4], a[5], (char *)NULL); break;
    case 7: execlp(f, a[0], a[1], a[2], a[3], a[4], a[5], a[6], (char *)NULL); break;
    case 8: execlp(f, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], (char *)NULL); break;
    default: return 98;
    }
    printf("errno=%d\n", errno);
    return 99;
}
