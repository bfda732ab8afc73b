/* via_execv FILE ARG0 [ARGS...]: execv(FILE, ARG0...). */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3)
        return 98;
    execv(argv[1], argv + 2);
    printf("errno=%d\n", errno);
    return 99;
}
