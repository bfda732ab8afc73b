/* small_stack MODE STACK_KB NARGS FILE ARG0: from a thread whose stack is STACK_KB
 * KiB with 16 MiB of PROT_NONE below it (so any overflow faults), run FILE with an
 * argv of NARGS elements (ARG0, then "a1", "a2", ...) by MODE: vfork (+ execve in
 * the child), posix_spawn, or execv (replacing this process). Exits with the
 * child's status, 128+N if it died of signal N; 97 and a message on an error. */
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static const char *mode, *file;
static char **args;
static int result = 97;

static int wait_for(pid_t pid)
{
    int status;
    if (waitpid(pid, &status, 0) < 0)
        return 97;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void *run(void *unused)
{
    (void)unused;
    pid_t pid;
    if (!strcmp(mode, "vfork")) {
        pid = vfork();
        if (pid == 0) {
            execve(file, args, environ);
            _exit(96);
        }
        result = pid < 0 ? 97 : wait_for(pid);
    } else if (!strcmp(mode, "posix_spawn")) {
        int rc = posix_spawn(&pid, file, NULL, NULL, args, environ);
        result = rc ? 95 : wait_for(pid);
    } else if (!strcmp(mode, "execv")) {
        execv(file, args);
        result = 96;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 6)
        return 97;
    mode = argv[1];
    size_t stack = strtoul(argv[2], NULL, 10) * 1024, guard = 16 << 20;
    long n = strtol(argv[3], NULL, 10);
    file = argv[4];
    args = calloc(n + 1, sizeof *args);
    if (!args)
        return 97;
    args[0] = argv[5];
    for (long i = 1; i < n; i++) {
        char buf[24];
        snprintf(buf, sizeof buf, "a%ld", i);
        args[i] = strdup(buf);
    }
    char *area = mmap(NULL, guard + stack, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED || mprotect(area + guard, stack, PROT_READ | PROT_WRITE)) {
        perror("small_stack: mmap");
        return 97;
    }
    pthread_attr_t attr;
    pthread_t t;
    pthread_attr_init(&attr);
    if (pthread_attr_setstack(&attr, area + guard, stack) ||
        pthread_create(&t, &attr, run, NULL) || pthread_join(t, NULL)) {
        fprintf(stderr, "small_stack: cannot start the thread\n");
        return 97;
    }
    return result;
}
