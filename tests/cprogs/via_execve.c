/* via_execve FILE ARG0 [ARGS...]: execve(FILE, ARG0..., environ). */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 3)
        return 98;
    execve(argv[1], argv + 2, environ);
    printf("errno=%d\n", errno);
    return 99;
}
