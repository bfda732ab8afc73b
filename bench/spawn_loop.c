/* spawn_loop N PROGRAM [ARGS...]: fork+execvp+waitpid N times and print each
 * iteration's wall time in nanoseconds, one per line. The benchmarks run it with
 * and without preloaded libraries, so only the preload differs between runs. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: spawn_loop N PROGRAM [ARGS...]\n");
        return 2;
    }
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        long long start = now_ns();
        pid_t pid = fork();
        if (pid == 0) {
            execvp(argv[2], argv + 2);
            _exit(127);
        }
        int status;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "spawn_loop: %s failed (status %d)\n", argv[2], status);
            return 1;
        }
        printf("%lld\n", now_ns() - start);
    }
    return 0;
}
