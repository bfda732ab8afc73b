/* exec_env FILE [NAME=VALUE...] -- ARG0 [ARGS...]: execve FILE with exactly these
 * environment entries, in this order (duplicates kept, unlike env(1)). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int sep = 2;
    while (sep < argc && strcmp(argv[sep], "--"))
        sep++;
    if (sep >= argc - 1)
        return 98;
    argv[sep] = NULL;
    execve(argv[1], argv + sep + 1, argv + 2);
    perror("exec_env");
    return 99;
}
