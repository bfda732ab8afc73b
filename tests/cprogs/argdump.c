/* Target program of the shim tests: writes "A<arg>\0" for each argv element,
 * then "E<entry>\0" for each environment entry, to stdout. */
#include <stdio.h>
#include <string.h>

extern char **environ;

int main(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        putchar('A');
        fwrite(argv[i], 1, strlen(argv[i]) + 1, stdout);
    }
    for (char **e = environ; *e; e++) {
        putchar('E');
        fwrite(*e, 1, strlen(*e) + 1, stdout);
    }
    return 0;
}
