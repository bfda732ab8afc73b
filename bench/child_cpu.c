/* child_cpu N PROGRAM [ARGS...]: fork+execvp+wait4 N times and print the CPU each
 * child used, its reaped children included (user + system, microseconds), one per
 * line. The kernel accounts that split by ticks, so only the sum is worth reading. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: child_cpu N PROGRAM [ARGS...]\n");
        return 2;
    }
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            execvp(argv[2], argv + 2);
            _exit(127);
        }
        int status;
        struct rusage ru;
        if (wait4(pid, &status, 0, &ru) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
            fprintf(stderr, "child_cpu: %s failed\n", argv[2]);
            return 1;
        }
        printf("%lld\n", (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL
                         + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    }
    return 0;
}
