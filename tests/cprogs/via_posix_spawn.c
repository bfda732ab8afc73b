/* via_posix_spawn FILE ARG0 [ARGS...]: posix_spawn, wait, exit with the child's status.
 * With SPAWN_STDOUT=PATH, a file action opens PATH as the child's stdout
 * (to check that file actions survive a redirect). */
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

extern char **environ;

int main(int argc, char **argv)
{
    posix_spawn_file_actions_t fa;
    const char *out = getenv("SPAWN_STDOUT");
    pid_t pid;
    int status;

    if (argc < 3)
        return 98;
    posix_spawn_file_actions_init(&fa);
    if (out)
        posix_spawn_file_actions_addopen(&fa, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int rc = posix_spawn(&pid, argv[1], &fa, NULL, argv + 2, environ);
    if (rc != 0) {
        printf("errno=%d\n", rc);
        return 99;
    }
    if (waitpid(pid, &status, 0) < 0)
        return 97;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
