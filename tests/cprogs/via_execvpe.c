/* via_execvpe FILE ARG0 [ARGS...]: execvpe(FILE, ARG0..., environ) (PATH search). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 3)
        return 98;
    execvpe(argv[1], argv + 2, environ);
    printf("errno=%d\n", errno);
    return 99;
}
