/* Finding the dispatcher of this user and state dir, and starting it when absent
 * (docs/internals.md, section 4). */
#ifndef ARVWRAP_CLIENT_CONNECT_H
#define ARVWRAP_CLIENT_CONNECT_H

#include <stddef.h>

/* A socket connected to the dispatcher (started first if need be). -1 when this
 * process's uid has no state dir it may use (a caller that changed uid under a
 * state dir of another user's, with no usable one of its own): why then says so. */
int connect_dispatcher(char *why, size_t cap);

/* environ with arv-wrap's shim taken out of LD_PRELOAD (the variable dropped if
 * nothing else is left): for the dispatcher, and for a call arv-wrap cannot serve. */
char **environ_without_shim(void);

#endif
