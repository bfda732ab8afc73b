/* Sanitizer options of the sanitized build only (csrc/native.py --sanitize).
 *
 * Compiled into the shim and into each program, so they hold even where the
 * environment was rebuilt from scratch (env -i drops ASAN_OPTIONS): the shim is
 * loaded into arbitrary programs, and libasan arrives as its dependency, not
 * first in the library list.  ASAN_OPTIONS / UBSAN_OPTIONS, when set, are read
 * after these and win.
 *
 * gcc 12's libubsan ignores log_path here (its reports go to stderr only), so
 * each of its reports is also appended to AW_SAN_LOG.ubsan.<pid> by its own
 * monitor hook, __ubsan_on_report.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifndef AW_SAN_LOG
#error "AW_SAN_LOG (the log path prefix) must be defined"
#endif

#define AW_SAN_COMMON "halt_on_error=1:abort_on_error=0:exitcode=86:log_path=" AW_SAN_LOG

__attribute__((visibility("default"), used)) const char *__asan_default_options(void)
{
    return AW_SAN_COMMON ":verify_asan_link_order=0:detect_leaks=0"
                         ":handle_segv=1:allow_user_segv_handler=1";
}

__attribute__((visibility("default"), used)) const char *__ubsan_default_options(void)
{
    return AW_SAN_COMMON ":print_stacktrace=1";
}

void __ubsan_get_current_report_data(const char **kind, const char **message,
                                     const char **file, unsigned *line, unsigned *col,
                                     char **addr);

/* Called by libubsan for each report (its "monitor" hook). */
__attribute__((visibility("default"), used)) void __ubsan_on_report(void)
{
    const char *kind = "", *message = "", *file = "";
    unsigned line = 0, col = 0;
    char *addr = NULL, text[8192], path[4096];
    __ubsan_get_current_report_data(&kind, &message, &file, &line, &col, &addr);
    int n = snprintf(text, sizeof text, "UndefinedBehaviorSanitizer: %s: %s:%u:%u: %s\n",
                     kind, file, line, col, message);
    snprintf(path, sizeof path, "%s.ubsan.%d", AW_SAN_LOG, (int)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd >= 0 && n > 0) {
        ssize_t w = write(fd, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
        (void)w;
    }
    if (fd >= 0)
        close(fd);
}
