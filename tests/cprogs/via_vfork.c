/* via_vfork FILE ARG0 [ARGS...]: vfork, execve in the child, wait, exit with its status. */
#include <errno.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static volatile int child_errno;   /* the vfork child shares our memory */

int main(int argc, char **argv)
{
    int status;

    if (argc < 3)
        return 98;
    pid_t pid = vfork();
    if (pid == 0) {
        execve(argv[1], argv + 2, environ);
        child_errno = errno;
        _exit(99);
    }
    if (pid < 0 || waitpid(pid, &status, 0) < 0)
        return 97;
    if (child_errno) {
        printf("errno=%d\n", child_errno);
        return 99;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
