/* via_popen FILE ARG0 [ARGS...]: popen("'FILE' 'ARG1' ...", "r"), copy its output
 * to stdout, exit with its status (ARG0 is not expressible: sh passes FILE). */
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
    size_t size = 1, n;
    char buf[4096];

    if (argc < 3)
        return 98;
    for (int i = 1; i < argc; i++)
        size += 4 * strlen(argv[i]) + 3;
    char *cmd = malloc(size), *p = quote(cmd, argv[1]);
    for (int i = 3; i < argc; i++)
        p = quote(p, argv[i]);
    FILE *f = popen(cmd, "r");
    if (!f) {
        printf("errno=%d\n", errno);
        return 99;
    }
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        fwrite(buf, 1, n, stdout);
    int status = pclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
