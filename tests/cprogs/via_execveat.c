/* via_execveat FILE ARG0 [ARGS...]: execveat(dirfd of FILE's directory, its basename,
 * ARG0..., environ, flags); AT_FDCWD for a FILE without '/'; flags from
 * $VIA_EXECVEAT_FLAGS (default 0).  With VIA_EXECVEAT_FD=1: open FILE and
 * execveat(fd, "", ..., AT_EMPTY_PATH) instead. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 3)
        return 98;
    if (getenv("VIA_EXECVEAT_FD")) {
        int fd = open(argv[1], O_RDONLY);
        if (fd >= 0)
            execveat(fd, "", argv + 2, environ, AT_EMPTY_PATH);
        printf("errno=%d\n", errno);
        return 99;
    }
    char *file = argv[1], *slash = strrchr(file, '/');
    int dirfd = AT_FDCWD;
    if (slash) {
        *slash = '\0';
        dirfd = open(slash == file ? "/" : file, O_PATH | O_DIRECTORY);
        file = slash + 1;
        if (dirfd < 0) {
            printf("errno=%d\n", errno);
            return 99;
        }
    }
    const char *flags = getenv("VIA_EXECVEAT_FLAGS");
    execveat(dirfd, file, argv + 2, environ, flags ? (int)strtol(flags, NULL, 0) : 0);
    printf("errno=%d\n", errno);
    return 99;
}
