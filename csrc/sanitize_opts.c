/* Sanitizer options of the sanitized build only (csrc/native.py --sanitize).
 *
 * Compiled into the shim and into each program, so they hold even where the
 * environment was rebuilt from scratch (env -i drops ASAN_OPTIONS): the shim is
 * loaded into arbitrary programs, and libasan arrives as its dependency, not
 * first in the library list.  ASAN_OPTIONS / UBSAN_OPTIONS, when set, are read
 * after these and win.
 */
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
