/* vfork_exec PROGRAM [ARGS...]: start PROGRAM as a child the way the client does
 * (vfork, execve, wait4) and exit as it did; nothing else. Linked like the client,
 * it is the cost of the client being a process of its own. */
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    pid_t pid = vfork();
    if (pid == 0) {
        execve(argv[1], argv + 1, environ);
        _exit(127);
    }
    int status;
    if (pid < 0 || waitpid(pid, &status, 0) < 0)
        return 125;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 125;
}
