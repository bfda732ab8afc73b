/* libFuzzer target: the client's reading of the dispatcher's replies
 * (csrc/client/wire.c: read_line, read_block, reply_is, parse_number), driven the
 * way handoff.c's handle_line drives them, on an arbitrary byte stream.
 *
 * The stream is served from a memfd, so the reader's own read() and refill logic
 * runs. Checked: every line is NUL-terminated inside the reader's buffer and
 * holds no newline; reply_is returns NULL or a pointer into the line; a number
 * parse_number accepts is in range and ends at the end or a space; a counted
 * "run" block comes back whole or not at all (NULL at EOF).
 */
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "client/wire.h"

_Noreturn void usage(void)
{
    abort();
}

static void check_number(const char *arg, long long lo, long long hi)
{
    const char *end = NULL;
    long long n = parse_number(arg, lo, hi, &end);
    if (n == -1)
        return;
    if (n < lo || n > hi || !end || (*end && *end != ' ') || end <= arg)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct reader r;
    int fd = memfd_create("reply", MFD_CLOEXEC);
    if (fd < 0 || (size && write(fd, data, size) != (ssize_t)size) || lseek(fd, 0, SEEK_SET))
        abort();
    memset(&r, 0, sizeof r);
    r.fd = fd;
    for (char *line; (line = read_line(&r));) {
        if (line < r.buf || line >= r.buf + sizeof r.buf)
            abort();
        size_t len = strlen(line);
        if (line + len >= r.buf + sizeof r.buf || memchr(line, '\n', len))
            abort();
        const char *words[] = {"warn", "job", "local", "exit", "signal", "fail", "run"};
        for (size_t w = 0; w < sizeof words / sizeof *words; w++) {
            const char *arg = reply_is(line, words[w]);
            if (arg && (arg < line || arg > line + len))
                abort();
        }
        const char *arg;
        if ((arg = reply_is(line, "exit")))
            check_number(arg, 0, 255);
        else if ((arg = reply_is(line, "signal")))
            check_number(arg, 1, NSIG - 1);
        else if ((arg = reply_is(line, "run"))) {
            const char *end;
            long long n = parse_number(arg, 1, 1LL << 20, &end);   /* (the client: 1 GiB) */
            if (n > 0) {
                char *block = read_block(&r, (size_t)n);
                if (block) {
                    if (block[n] != '\0')
                        abort();
                    release_block(block);
                }
            }
        }
    }
    close(fd);
    return 0;
}
