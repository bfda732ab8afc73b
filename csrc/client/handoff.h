#ifndef ARVWRAP_CLIENT_HANDOFF_H
#define ARVWRAP_CLIENT_HANDOFF_H
/* --shim IDX RESOLVED ARGV...: hand the call to the dispatcher and act as the tool. */
_Noreturn void run_shim(const char *idx, const char *resolved, char **targv);
#endif
