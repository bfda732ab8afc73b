/* The client's side of the client <-> dispatcher protocol (docs/internals.md,
 * section 4): the request with the caller's descriptors, and reading replies. */
#ifndef ARVWRAP_CLIENT_WIRE_H
#define ARVWRAP_CLIENT_WIRE_H

#include <signal.h>
#include <stddef.h>
#include "../common/common.h"

#define MAX_FDS 253                 /* SCM_MAX_FD: the kernel's limit per message */

struct fdlist {                     /* the caller's descriptors that go with the call */
    int n;
    int fd[MAX_FDS];
};

/* Fds 0-2 and every fd argv names as /dev/fd/N or /proc/self/fd/N. Call it before
 * opening anything, so no descriptor of ours is taken for the caller's. */
void collect_fds(struct fdlist *l, char **targv);
/* The call without the caller's process state (rlimits, nice, signals): the
 * dispatcher asks for that with "state" when a remote backend needs it. */
void build_request(struct buf *b, const char *idx, const char *resolved, char **targv,
                   const struct fdlist *l);
void send_request(int fd, const struct buf *b, const struct fdlist *l);
/* The answer to "state": "state " + the L, N, G and B fields + newline, given the
 * caller's signal mask and the signals the client installed its handlers for. */
void build_state_line(struct buf *b, const sigset_t *callers_mask, const sigset_t *handled);

/* Replies: text lines, and a counted block of bytes after a "run" line; the
 * descriptors that came with them, in order (close-on-exec, numbered >= 10). */
#define READER_FDS 3
struct reader {
    int fd;
    size_t start, len;
    int nfds, fds[READER_FDS];
    char buf[65536];
};
char *read_line(struct reader *r);           /* NUL-terminated, no newline; NULL at EOF */
/* n bytes + NUL, good until the next read_block (the client reads one); NULL at EOF */
char *read_block(struct reader *r, size_t n);
void release_block(char *block);             /* frees one too large for the static space */

/* "word" or "word ...": the text after the space (or ""); NULL if line is another word. */
const char *reply_is(const char *line, const char *word);
/* A decimal in [lo, hi] up to the end or a space (*end is set); -1 if not. */
long long parse_number(const char *s, long long lo, long long hi, const char **end);

#endif
