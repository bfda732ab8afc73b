/* via_fexecve FILE ARG0 [ARGS...]: open FILE, fexecve(fd, ARG0..., environ). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 3)
        return 98;
    int fd = open(argv[1], O_RDONLY);  /* not O_CLOEXEC: scripts need /dev/fd/N */
    if (fd >= 0)
        fexecve(fd, argv + 2, environ);
    printf("errno=%d\n", errno);
    return 99;
}
