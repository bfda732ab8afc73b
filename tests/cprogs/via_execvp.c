/* via_execvp FILE ARG0 [ARGS...]: execvp(FILE, ARG0...) (PATH search). */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3)
        return 98;
    execvp(argv[1], argv + 2);
    printf("errno=%d\n", errno);
    return 99;
}
