/* libarvwrap.so: the LD_PRELOAD shim of arv-wrap.
 *
 * It hooks every exec entry point of glibc (which reach the kernel through
 * internal calls, so each needs its own hook) and, for an exec whose program
 * matches ARV_WRAP_RULES, execs arv-wrap-client instead (docs/internals.md, 3):
 *     <dir of ARV_WRAP_SHIM>/arv-wrap-client --shim <rule> <abs path> <argv...>
 *
 * Guarantees, and why:
 *  - vfork safety.  Hooks run in vfork children (CPython's subprocess, glibc's
 *    posix_spawn, shells): no malloc, no locks, no stdio, no waiting; stack
 *    buffers and raw syscalls only.
 *  - No dlsym in the exec paths (it takes locks and may allocate): the real
 *    execve/execveat are raw syscalls and PATH search is done here, mirroring
 *    glibc 2.36's execvpe so errno on failure is glibc's.  Only posix_spawn*,
 *    which run in the parent, look the real function up (once, lazily).
 *  - Transparency.  errno is the caller's at every pass-through; a call is
 *    redirected only when its program resolves to an executable regular file,
 *    otherwise the real exec runs and fails exactly as without arv-wrap.
 *  - Env repair.  Programs that rebuild the environment (`env -i`, runners
 *    passing only PATH) would drop the interception: every hooked exec (passed
 *    through or redirected) puts the shim back into LD_PRELOAD (other preload
 *    entries kept) and re-adds the ARV_WRAP_* entries this process started with.
 *  - ARV_WRAP_DISABLE=1 in the process's environment at load, or in an exec's
 *    envp, passes that exec through untouched (no repair).  Without
 *    ARV_WRAP_RULES or ARV_WRAP_SHIM, everything passes through untouched.
 *  - Cheap load and cheap pass-through: the constructor only scans environ
 *    once, and neither it nor a non-matching exec calls into libc (no lazy
 *    PLT binding, no write to the shim's data in a fork child): the string
 *    functions are the shim's own (csrc/sys.c, hidden, also used by match.c
 *    and env.c) and syscalls are made inline (csrc/sys.h).  Only cold paths
 *    (errno on failure, dlsym, strerrordesc_np) reach libc.
 *  - Only the hooks are exported (-fvisibility=hidden elsewhere).
 *  - Bounded stack for any argv and envp: the shim's own arrays are capped
 *    (ENV_MAX, ARGV_STACK_MAX; see intercept), an argv longer than
 *    ARGV_STACK_MAX reaches the client in the environment form (redirect).  The
 *    only arrays that grow with argc are the ones glibc's own call makes in the
 *    same place, and they replace glibc's: the execl* hooks' argument array, and
 *    the /bin/sh argv of a #!-less script (exec_script).
 *
 * Requirements and the tests that prove them (tests/test_shim.py):
 *  - each exec variant redirects with exact argv ........ test_redirect_exact_argv
 *  - unmatched calls run the real program, same argv ..... test_passthrough_exact_argv
 *  - same errno with and without the shim ................ test_errno_unchanged, test_errno_path_search,
 *                                                          test_errno_execveat_flags
 *  - fexecve/execveat name the program by fd or dirfd .... test_execveat_by_descriptor_and_dirfd
 *  - ENOEXEC scripts run through /bin/sh as glibc does .... test_noexec_script_like_glibc
 *  - ARV_WRAP_DISABLE=1 in environ / in envp ............. test_disable_in_environment, test_disable_in_envp
 *  - env repair (env -i, PATH-only runners) .............. test_env_repair_*
 *  - a second preload library is kept .................... test_second_preload_*
 *  - shells, Python (vfork, posix_spawn), make, xargs ... test_callers_*
 *  - non-whitelisted programs untouched .................. test_not_whitelisted_untouched
 *  - name and path rules, precedence, symlinks ........... test_rules_*
 *  - `when` conditions (s=, x=) .......................... test_conditions
 *  - client failing to start: warning, then real exec .... test_client_missing_falls_back,
 *                                                          test_spawn_failing_file_action_no_warning
 *  - relative paths and PATH resolution .................. test_relative_and_path_resolution
 *  - the client's argv, env and spawn file actions ....... test_fake_client_sees_protocol_and_repaired_env,
 *                                                          test_spawn_file_actions_kept
 *  - malformed or missing rules/shim vars: pass through .. test_malformed_rules_pass_through,
 *                                                          test_no_rules_or_no_shim_var_passes_through
 *  - only the hooks exported ............................. test_exports_only_hooks
 *  - bounded stack, huge argv (tests/test_stack.py) ...... test_huge_argv_*
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "env.h"
#include "match.h"
#include "sys.h"

#ifndef __SANITIZE_ADDRESS__
#define EXPORT __attribute__((visibility("default")))
#define HOOK_ENTRY() ((void)0)
#else
/* The sanitized build (csrc/native.py --sanitize): a hook that ran in a vfork
 * child left ASan's poison for its stack frames in the shadow of the parent's
 * stack (the child execs without returning through them), so a later call in
 * the parent would see false stack overflows.  The hooks themselves are not
 * instrumented, and each first unpoisons the stack below its frame, where every
 * instrumented frame of the shim will be (its stack use is bounded, see intercept). */
#include <sanitizer/asan_interface.h>
#define EXPORT __attribute__((visibility("default"), no_sanitize_address))
#define HOOK_ENTRY() clean_stack_below(__builtin_frame_address(0))
#define STACK_CLEAN (512 * 1024)
__attribute__((no_sanitize_address, noinline)) static void clean_stack_below(char *frame)
{
    __asan_unpoison_memory_region(frame - STACK_CLEAN, STACK_CLEAN);
}
#endif

extern char **environ;

#define ENV_MAX 4096            /* larger envps are passed on without repair (stack) */
#define ENV_MAX_S "4096"
#define ARGV_STACK_MAX 1024     /* longer argvs reach the client in the environment form */
#define ARGV_STACK_MAX_S "1024"
#define CALL_VAR "ARV_WRAP_CALL="   /* the environment form's entry (redirect) */
#define CALL_VAR_LEN (sizeof CALL_VAR - 1)
#define PRELOAD_MAX 4096        /* so is an LD_PRELOAD value longer than this */
#define ARENA_SIZE 8192        /* larger values are used in place */

/* What the constructor found in this process's environment. */
static struct {
    int active;                 /* 0: every call passes through untouched */
    const char *rules;          /* value of ARV_WRAP_RULES */
    struct aw_envcfg env;       /* the shim's path (ARV_WRAP_SHIM) and the
                                   "ARV_WRAP_*=..." entries, for env repair */
    size_t dir_len;             /* of dirname(shim): the client is dir + CLIENT */
    /* Copies of the ARV_WRAP_* entries: a process may overwrite its original
     * environment area (setproctitle does), so keep our own.  Last, right
     * after the fields above, so the constructor dirties as few pages as it can. */
    size_t arena_used;
    char arena[ARENA_SIZE];
} g;

#define CLIENT "/arv-wrap-client"
#define CLIENT_LEN (sizeof CLIENT - 1)

/* ------------------------------------------------------------------ */
/* constructor                                                          */

static const char *remember(const char *entry)
{
    char *copy = g.arena + g.arena_used, *d = copy;
    const char *s = entry;
    for (size_t room = sizeof g.arena - g.arena_used; room; room--)   /* one pass */
        if ((*d++ = *s++) == '\0') {
            g.arena_used += (size_t)(d - copy);
            return copy;
        }
    return entry;               /* does not fit (the partial copy is unused) */
}

__attribute__((constructor)) static void arvwrap_init(void)
{
    for (char **e = environ; e && *e; e++) {
        if (!starts_with(*e, "ARV_WRAP_"))
            continue;
        if (strcmp(*e, "ARV_WRAP_DISABLE=1") == 0)
            return;
        if (g.env.nkeep == AW_MAX_KEEP || starts_with(*e, CALL_VAR))
            continue;           /* (a client's own call is never passed on) */
        const char *kept = g.env.keep[g.env.nkeep++] = remember(*e);
        if (starts_with(kept, "ARV_WRAP_RULES="))
            g.rules = kept + strlen("ARV_WRAP_RULES=");
        else if (starts_with(kept, "ARV_WRAP_SHIM="))
            g.env.shim = kept + strlen("ARV_WRAP_SHIM=");
    }
    if (!g.rules || !g.env.shim || g.env.shim[0] != '/')
        return;
    g.env.shim_len = strlen(g.env.shim);
    g.dir_len = (size_t)(strrchr(g.env.shim, '/') - g.env.shim);
    if (g.dir_len + CLIENT_LEN >= PATH_MAX)
        return;
    g.active = 1;
}

/* dirname(shim) + "/arv-wrap-client" into buf[PATH_MAX] (it fits: see above). */
static char *client_path(char *buf)
{
    memcpy(buf, g.env.shim, g.dir_len);
    memcpy(buf + g.dir_len, CLIENT, CLIENT_LEN + 1);
    return buf;
}

/* ------------------------------------------------------------------ */
/* one exec call, whatever the entry point                              */

struct call {
    const char *file;           /* path, or name to search in PATH, as given */
    char *const *argv;
    char *const *envp;
    int dirfd, flags;           /* fexecve, execveat */
    int spawn;                  /* posix_spawn*: real() returns, with an error number */
    pid_t *pid;
    const posix_spawn_file_actions_t *actions;
    const posix_spawnattr_t *attr;
};

/* The real call with envp: returns what the hooked function returns. */
typedef int (*real_fn)(const struct call *c, char *const envp[]);
/* The absolute path the call would run into buf: 0, or -1 if none. */
typedef int (*resolve_fn)(const struct call *c, char *buf, size_t size);
/* Start prog instead of the call's program: 0 on success, else an errno value. */
typedef int (*launch_fn)(const struct call *c, const char *prog, char *const argv[],
                         char *const envp[]);

/* ------------------------------------------------------------------ */
/* real functions: glibc 2.36's behaviour, without calling into its exec */

/* glibc runs a file the kernel refused with ENOEXEC as a /bin/sh script. */
static void exec_script(const char *file, char *const argv[], char *const envp[])
{
    ptrdiff_t argc = 0;
    while (argv[argc]) {
        if (argc++ == INT_MAX - 1) {
            errno = E2BIG;
            return;
        }
    }
    char *sh_argv[argc > 1 ? argc + 2 : 3];
    sh_argv[0] = (char *)"/bin/sh";
    sh_argv[1] = (char *)file;
    if (argc > 1)
        memcpy(sh_argv + 2, argv + 1, (size_t)argc * sizeof *argv);  /* with the NULL */
    else
        sh_argv[2] = NULL;
    sys_execve(sh_argv[0], sh_argv, envp);
}

/* glibc's __execvpe_common with exec_script = true, PATH from our environ. */
static int search_and_exec(const char *file, char *const argv[], char *const envp[])
{
    if (*file == '\0') {
        errno = ENOENT;
        return -1;
    }
    if (strchr(file, '/')) {
        sys_execve(file, argv, envp);
        if (errno == ENOEXEC)
            exec_script(file, argv, envp);
        return -1;
    }
    const char *path = env_value(environ, "PATH");
    if (!path)
        path = "/bin:/usr/bin";
    size_t file_len = strnlen(file, NAME_MAX) + 1;
    size_t path_len = strnlen(path, PATH_MAX - 1) + 1;
    if (file_len - 1 > NAME_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int got_eacces = 0;
    char buffer[path_len + file_len + 1];
    for (const char *p = path, *end;; p = end) {
        end = strchrnul(p, ':');
        if ((size_t)(end - p) >= path_len) {    /* longer than the buffer */
            if (*end == '\0')
                break;
            continue;
        }
        /* "dir/file", or just "file" for an empty element (the cwd) */
        memcpy(buffer, p, (size_t)(end - p));
        char *pend = buffer + (end - p);
        *pend = '/';
        memcpy(pend + (p < end), file, file_len);

        sys_execve(buffer, argv, envp);
        if (errno == ENOEXEC)
            exec_script(buffer, argv, envp);
        switch (errno) {
        case EACCES:
            got_eacces = 1;
            /* fall through */
        case ENOENT:
        case ESTALE:
        case ENOTDIR:
        case ENODEV:
        case ETIMEDOUT:
            break;              /* not here: try the next directory */
        default:
            return -1;          /* found, but it failed: that is the answer */
        }
        if (*end++ == '\0')
            break;
    }
    if (got_eacces)
        errno = EACCES;
    return -1;
}

static int real_execve(const struct call *c, char *const envp[])
{
    return (int)sys_execve(c->file, c->argv, envp);
}

static int real_execvpe(const struct call *c, char *const envp[])
{
    return search_and_exec(c->file, c->argv, envp);
}

static int real_execveat(const struct call *c, char *const envp[])
{
    return (int)sys5(SYS_execveat, c->dirfd, (long)c->file, (long)c->argv, (long)envp,
                     c->flags);
}

/* "/proc/self/fd/<fd>" into buf. */
static const char *fd_path(char buf[32], int fd)
{
    char num[16];
    size_t len = 0;
    append(buf, 32, &len, "/proc/self/fd/", 14);
    const char *d = decimal(num, sizeof num, fd);
    append(buf, 32, &len, d, strlen(d));
    return buf;
}

/* glibc's fexecve: execveat on the descriptor; /proc/self/fd only without execveat. */
static int real_fexecve(const struct call *c, char *const envp[])
{
    char buf[32];
    struct stat st;

    if (c->dirfd < 0 || !c->argv || !envp) {
        errno = EINVAL;
        return -1;
    }
    sys5(SYS_execveat, c->dirfd, (long)"", (long)c->argv, (long)envp, AT_EMPTY_PATH);
    if (errno != ENOSYS)
        return -1;
    sys_execve(fd_path(buf, c->dirfd), c->argv, envp);
    int save = errno;
    if (raw_fstatat(AT_FDCWD, "/proc/self/fd", &st, 0) == -ENOENT)
        save = ENOSYS;
    errno = save;
    return -1;
}

typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);

/* The next posix_spawn or posix_spawnp.  These hooks run in the parent, where
 * dlsym is safe; racing threads store the same value. */
static spawn_fn next_spawn(int search)
{
    static spawn_fn cache[2];
    spawn_fn f = __atomic_load_n(&cache[search], __ATOMIC_ACQUIRE);
    if (!f) {
        f = (spawn_fn)dlsym(RTLD_NEXT, search ? "posix_spawnp" : "posix_spawn");
        __atomic_store_n(&cache[search], f, __ATOMIC_RELEASE);
    }
    return f;
}

static int spawn_with(int search, const struct call *c, const char *prog,
                      char *const argv[], char *const envp[])
{
    spawn_fn f = next_spawn(search);
    return f ? f(c->pid, prog, c->actions, c->attr, argv, envp) : ENOSYS;
}

static int real_spawn(const struct call *c, char *const envp[])
{
    return spawn_with(0, c, c->file, c->argv, envp);
}

static int real_spawnp(const struct call *c, char *const envp[])
{
    return spawn_with(1, c, c->file, c->argv, envp);
}

/* ------------------------------------------------------------------ */
/* launching the client                                                 */

static int launch_exec(const struct call *c, const char *prog, char *const argv[],
                       char *const envp[])
{
    (void)c;
    return (int)-RAW(SYS_execve, prog, argv, envp, 0, 0);
}

static int launch_spawn(const struct call *c, const char *prog, char *const argv[],
                        char *const envp[])
{
    return spawn_with(0, c, prog, argv, envp);
}

/* ------------------------------------------------------------------ */
/* resolving the program to an absolute path (symlinks not followed)    */

/* dir (absolute) + "/" + rel into buf, dropping "." and empty components. */
static int join(char *buf, size_t size, const char *dir, const char *rel)
{
    size_t len = 0;

    if (append(buf, size, &len, dir, strlen(dir)) < 0)
        return -1;
    while (len > 1 && buf[len - 1] == '/')
        buf[--len] = '\0';
    for (const char *p = rel, *end; *p; p = end) {
        end = strchrnul(p, '/');
        size_t n = (size_t)(end - p);
        if (*end)
            end++;
        if (n == 0 || (n == 1 && p[0] == '.'))
            continue;
        if ((len > 1 || buf[0] != '/') && append(buf, size, &len, "/", 1) < 0)
            return -1;
        if (append(buf, size, &len, p, n) < 0)
            return -1;
    }
    return 0;
}

/* Does path have to name a directory ("x/", "x/.", "..")?  join() would
 * hide that from the check that decides whether to redirect. */
static int names_dir(const char *path)
{
    const char *last = base_name(path);
    return last[0] == '\0' || strcmp(last, ".") == 0 || strcmp(last, "..") == 0;
}

static int absolute(const char *path, char *buf, size_t size)
{
    char cwd[PATH_MAX];

    if (names_dir(path))
        return -1;
    if (path[0] == '/')
        return join(buf, size, "/", path);
    /* raw getcwd: glibc's falls back to opendir/malloc for long paths */
    if (RAW(SYS_getcwd, cwd, sizeof cwd, 0, 0, 0) < 0 || cwd[0] != '/')
        return -1;
    return join(buf, size, cwd, path);
}

static int executable_file(const char *path)
{
    struct stat st;
    return raw_fstatat(AT_FDCWD, path, &st, 0) == 0 && S_ISREG(st.st_mode) &&
           RAW(SYS_faccessat, AT_FDCWD, path, X_OK, 0, 0) == 0;
}

/* Whether the kernel execs the file itself: ELF or #!. A script without #! is the
 * caller's exec to handle (execvp runs /bin/sh, bash runs it itself, execve fails
 * with ENOEXEC), so it is never redirected. A file we cannot read is assumed
 * executable (execute-only binaries exist). */
static int kernel_format(const char *path)
{
    unsigned char head[4];
    long fd = RAW(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0, 0);
    if (fd < 0)
        return 1;
    long n = RAW(SYS_read, fd, head, sizeof head, 0, 0);
    RAW(SYS_close, fd, 0, 0, 0, 0);
    return (n >= 2 && head[0] == '#' && head[1] == '!') ||
           (n == 4 && memcmp(head, "\177ELF", 4) == 0);
}

static int resolve_path(const struct call *c, char *buf, size_t size)
{
    return absolute(c->file, buf, size);
}

/* "dir/file" into buf ("file" alone for an empty dir, i.e. the cwd): 0, or -1 if too long. */
static int dir_file(char *buf, size_t size, const char *dir, size_t dir_len, const char *file)
{
    size_t len = 0;

    buf[0] = '\0';
    if (dir_len && (append(buf, size, &len, dir, dir_len) < 0 ||
                    append(buf, size, &len, "/", 1) < 0))
        return -1;
    return append(buf, size, &len, file, strlen(file));
}

/* PATH search as execvp does it: the first executable regular file. */
static int resolve_search(const struct call *c, char *buf, size_t size)
{
    const char *path;
    char cand[PATH_MAX];

    if (strchr(c->file, '/'))
        return absolute(c->file, buf, size);
    if (c->file[0] == '\0')
        return -1;
    path = env_value(environ, "PATH");
    if (!path)
        path = "/bin:/usr/bin";
    for (const char *p = path, *end;; p = end + 1) {
        end = strchrnul(p, ':');
        if (dir_file(cand, sizeof cand, p, (size_t)(end - p), c->file) == 0 &&
            executable_file(cand))
            return absolute(cand, buf, size);
        if (*end == '\0')
            return -1;
    }
}

/* The file behind a descriptor, as the kernel names it. */
static int fd_target(int fd, char *buf, size_t size)
{
    char link[32];
    if (fd < 0)
        return -1;
    long n = RAW(SYS_readlinkat, AT_FDCWD, fd_path(link, fd), buf, size - 1, 0);
    if (n <= 0 || buf[0] != '/')
        return -1;
    buf[n] = '\0';
    return 0;
}

static int resolve_fd(const struct call *c, char *buf, size_t size)
{
    return fd_target(c->dirfd, buf, size);
}

static int resolve_at(const struct call *c, char *buf, size_t size)
{
    char dir[PATH_MAX];
    struct stat st;

    if (c->flags & ~(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
        return -1;              /* the kernel will refuse it (EINVAL) */
    if (c->file[0] == '\0')
        return (c->flags & AT_EMPTY_PATH) ? fd_target(c->dirfd, buf, size) : -1;
    if ((c->flags & AT_SYMLINK_NOFOLLOW) &&
        (raw_fstatat(c->dirfd, c->file, &st, AT_SYMLINK_NOFOLLOW) != 0 || S_ISLNK(st.st_mode)))
        return -1;              /* the kernel will refuse it (ELOOP) */
    if (c->file[0] == '/' || c->dirfd == AT_FDCWD)
        return absolute(c->file, buf, size);
    if (names_dir(c->file) || fd_target(c->dirfd, dir, sizeof dir) < 0)
        return -1;
    return join(buf, size, dir, c->file);
}

/* ------------------------------------------------------------------ */
/* the decision                                                         */

/* Rule index to redirect with (abs filled in), or -1 to pass through. */
static int decide(const struct call *c, resolve_fn resolve, char *abs, size_t size)
{
    const char *name = base_name(c->file);
    int rule;

    if (*name == '\0' || aw_has_path_rules(g.rules)) {
        if (resolve(c, abs, size) < 0)
            return -1;
        if (*name == '\0')
            name = base_name(abs);  /* fexecve, execveat with AT_EMPTY_PATH */
        rule = aw_match(g.rules, name, abs, c->argv);
    } else {
        rule = aw_match(g.rules, name, NULL, c->argv);
        if (rule >= 0 && resolve(c, abs, size) < 0)
            return -1;
    }
    if (rule < 0 || !executable_file(abs) || !kernel_format(abs))
        return -1;
    return rule;
}

/* One line on stderr, with write() only: "arv-wrap: <a><b>: <c>\n". */
static void warn3(const char *a, const char *b, const char *c)
{
    char line[2 * PATH_MAX + 128];
    size_t len = 0;

    append(line, sizeof line, &len, "arv-wrap: ", 10);
    append(line, sizeof line, &len, a, strlen(a));
    append(line, sizeof line, &len, b, strlen(b));
    append(line, sizeof line, &len, ": ", 2);
    append(line, sizeof line, &len, c, strlen(c));
    append(line, sizeof line, &len, "\n", 1);
    RAW(SYS_write, 2, line, len, 0, 0);
}

/* The client could not be started (strerrordesc_np needs no locale). */
static void warn_client(int err)
{
    const char *desc = strerrordesc_np(err);
    char num[16], client[PATH_MAX];

    if (!desc)
        desc = decimal(num, sizeof num, err);
    warn3("cannot run ", client_path(client), desc);
}

/* Start the client for rule with envp.  Up to ARGV_STACK_MAX arguments, in the
 * argv form [client, --shim, rule, abs, argv...]; above that, in the environment
 * form: the caller's argv as it is, and "ARV_WRAP_CALL=<rule>:<abs>" in front of
 * envp, which is then a copy with a free slot before it (envp_slot0 + 1 == envp),
 * so that the stack never holds a copy of a long argv. */
static int redirect(const struct call *c, launch_fn launch, int rule, char *abs,
                    char *const envp[], char **envp_slot0, size_t argc)
{
    char num[16], client[PATH_MAX];

    if (argc > ARGV_STACK_MAX) {
        if (!envp_slot0)
            return E2BIG;           /* not reached: intercept falls back first */
        char call[CALL_VAR_LEN + 16 + PATH_MAX];
        size_t len = 0;
        append(call, sizeof call, &len, CALL_VAR, CALL_VAR_LEN);
        const char *d = decimal(num, sizeof num, rule);
        append(call, sizeof call, &len, d, strlen(d));
        append(call, sizeof call, &len, ":", 1);
        if (append(call, sizeof call, &len, abs, strlen(abs)) < 0)
            return ENAMETOOLONG;    /* not reached: abs < PATH_MAX */
        envp_slot0[0] = call;
        return launch(c, client_path(client), c->argv, envp_slot0);
    }
    char *argv[argc + 5];
    argv[0] = client_path(client);
    argv[1] = (char *)"--shim";
    argv[2] = decimal(num, sizeof num, rule);
    argv[3] = abs;
    memcpy(argv + 4, c->argv, (argc + 1) * sizeof *argv);
    return launch(c, argv[0], argv, envp);
}

/* ------------------------------------------------------------------ */
/* the core every hook funnels into                                     */

/* The client could not be started (err, or 0 for "argv and envp too large to
 * redirect within the stack bound"): run the real call instead.  An exec only
 * comes back on failure, so warn first.  A spawn may have failed for the caller's
 * own file actions or attributes, which fail the tool alike: warn only if the
 * tool then starts, so such a call fails exactly as without arv-wrap. */
static int fall_back(const struct call *c, real_fn real, char *const envp[], int err,
                     int saved, const char *abs)
{
    int ret = 0;
    if (c->spawn) {
        errno = saved;
        ret = real(c, envp);
        if (ret != 0)
            return ret;
    }
    if (err)
        warn_client(err);
    else
        warn3(abs, "", "not redirected (more than " ARGV_STACK_MAX_S " arguments and "
              ENV_MAX_S " environment entries): running it here");
    if (c->spawn)
        return ret;
    errno = saved;
    return real(c, envp);
}

/* errno is read only on the way to a redirect: up to there nothing changes it
 * (raw syscalls only), so a pass-through sees the caller's errno as is.
 *
 * Stack: bounded whatever the size of argv and envp (the hook may run in a vfork
 * child on the caller's stack): the envp copy holds at most ENV_MAX + AW_MAX_KEEP + 3
 * pointers and the client's argv at most ARGV_STACK_MAX + 5, the rest is a few
 * PATH_MAX buffers: under 64 KiB in all (test_huge_argv_small_stack_*). */
static int intercept(const struct call *c, real_fn real, resolve_fn resolve, launch_fn launch)
{
    struct aw_envscan s;

    if (!g.active || !c->file || !c->argv || !c->argv[0] || !c->envp)
        return real(c, c->envp);
    aw_scan_env(&g.env, c->envp, &s);
    if (s.disabled)
        return real(c, c->envp);

    size_t argc = 0;
    while (c->argv[argc])
        argc++;
    size_t pre_len = aw_preload_size(&g.env, &s);
    int repair = (pre_len || s.missing) && pre_len <= PRELOAD_MAX;
    /* a copy of envp, with a free slot in front for the environment form */
    int copy = (repair || argc > ARGV_STACK_MAX) && s.n <= ENV_MAX;
    char *env_buf[copy ? aw_repaired_slots(&g.env, &s) + 1 : 2];
    char pre_buf[copy && repair && pre_len ? pre_len : 1];
    char *const *envp = c->envp;
    if (copy) {
        if (repair && pre_len)
            aw_make_preload(&g.env, &s, pre_buf, pre_len);
        envp = aw_repair_env(&g.env, c->envp, &s, env_buf + 1, pre_buf,
                             repair ? pre_len : 0);
    }

    char abs[PATH_MAX];
    int rule = decide(c, resolve, abs, sizeof abs);
    if (rule < 0)
        return real(c, envp);
    int saved = errno;          /* the real posix_spawn may change it */
    if (argc > ARGV_STACK_MAX && !copy)
        return fall_back(c, real, envp, 0, saved, abs);
    int err = redirect(c, launch, rule, abs, envp, copy ? env_buf : NULL, argc);
    if (err == 0)
        return 0;               /* spawned (an exec does not come back) */
    return fall_back(c, real, envp, err, saved, abs);
}

/* ------------------------------------------------------------------ */
/* the hooks                                                            */

static int run(const char *file, char *const argv[], char *const envp[], int search)
{
    struct call c = { .file = file, .argv = argv, .envp = envp };
    return intercept(&c, search ? real_execvpe : real_execve,
                     search ? resolve_search : resolve_path, launch_exec);
}

EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
    HOOK_ENTRY();
    return run(path, argv, envp, 0);
}

EXPORT int execv(const char *path, char *const argv[])
{
    HOOK_ENTRY();
    return run(path, argv, environ, 0);
}

EXPORT int execvp(const char *file, char *const argv[])
{
    HOOK_ENTRY();
    return run(file, argv, environ, 1);
}

EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
    HOOK_ENTRY();
    return run(file, argv, envp, 1);
}

/* The execl* family: count the arguments, then collect them into a stack
 * array, as glibc does (no allocation: they may run in a vfork child). */

/* Number of arguments from arg to the NULL (arg included), -1 if too many. */
static ptrdiff_t count_args(va_list ap)
{
    ptrdiff_t argc = 1;
    while (va_arg(ap, const char *))
        if (argc++ == INT_MAX)
            return -1;
    return argc;
}

/* Fill argv[0..argc] (argv[argc] is the NULL); leaves ap after the NULL. */
static void collect_args(char **argv, ptrdiff_t argc, const char *arg, va_list *ap)
{
    argv[0] = (char *)arg;
    for (ptrdiff_t i = 1; i <= argc; i++)
        argv[i] = va_arg(*ap, char *);
}

/* The body of an execl* hook: gather the NULL-terminated argument list (and,
 * for execle, the envp after it) into a stack array. A macro, because that
 * array must live in the hook's own frame. */
#define EXECL_BODY(file, arg, search, envp_follows)                              \
    do {                                                                         \
        va_list ap;                                                              \
        va_start(ap, arg);                                                       \
        ptrdiff_t argc = count_args(ap);                                         \
        va_end(ap);                                                              \
        if (argc < 0) {                                                          \
            errno = E2BIG;                                                       \
            return -1;                                                           \
        }                                                                        \
        char *argv[argc + 1];                                                    \
        va_start(ap, arg);                                                       \
        collect_args(argv, argc, arg, &ap);                                      \
        char *const *envp = (envp_follows) ? va_arg(ap, char *const *) : environ; \
        va_end(ap);                                                              \
        return run(file, argv, envp, search);                                    \
    } while (0)

EXPORT int execl(const char *path, const char *arg, ...)
{
    HOOK_ENTRY();
    EXECL_BODY(path, arg, 0, 0);
}

EXPORT int execlp(const char *file, const char *arg, ...)
{
    HOOK_ENTRY();
    EXECL_BODY(file, arg, 1, 0);
}

EXPORT int execle(const char *path, const char *arg, ...)
{
    HOOK_ENTRY();
    EXECL_BODY(path, arg, 0, 1);
}

EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
    HOOK_ENTRY();
    struct call c = { .file = "", .argv = argv, .envp = envp, .dirfd = fd };
    return intercept(&c, real_fexecve, resolve_fd, launch_exec);
}

EXPORT int execveat(int dirfd, const char *path, char *const argv[], char *const envp[],
                    int flags)
{
    HOOK_ENTRY();
    struct call c = { .file = path, .argv = argv, .envp = envp, .dirfd = dirfd,
                      .flags = flags };
    return intercept(&c, real_execveat, resolve_at, launch_exec);
}

EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *actions,
                       const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    HOOK_ENTRY();
    struct call c = { .file = path, .argv = argv, .envp = envp, .spawn = 1, .pid = pid,
                      .actions = actions, .attr = attr };
    return intercept(&c, real_spawn, resolve_path, launch_spawn);
}

EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *actions,
                        const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    HOOK_ENTRY();
    struct call c = { .file = file, .argv = argv, .envp = envp, .spawn = 1, .pid = pid,
                      .actions = actions, .attr = attr };
    return intercept(&c, real_spawnp, resolve_search, launch_spawn);
}
