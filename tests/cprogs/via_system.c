/* via_system FILE ARG0 [ARGS...]: system("'FILE' 'ARG1' ...") (ARG0 is not
 * expressible in sh: the shell passes FILE as argv[0]); exits with its status. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* Append s single-quoted for sh ('\'' for each quote) and a space. */
static char *quote(char *out, const char *s)
{
    *out++ = '\'';
    for (; *s; s++) {
        if (*s == '\'') {
            memcpy(out, "'\\''", 4);
            out += 4;
        } else {
            *out++ = *s;
        }
    }
    *out++ = '\'';
    *out++ = ' ';
    *out = '\0';
    return out;
}

int main(int argc, char **argv)
{
    size_t size = 1;
    if (argc < 3)
        return 98;
    for (int i = 1; i < argc; i++)
        size += 4 * strlen(argv[i]) + 3;
    char *cmd = malloc(size), *p = quote(cmd, argv[1]);
    for (int i = 3; i < argc; i++)
        p = quote(p, argv[i]);
    int status = system(cmd);
    if (status < 0) {
        printf("errno=%d\n", errno);
        return 99;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
