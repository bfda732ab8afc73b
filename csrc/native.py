"""How the native programs are built (setup.py, and the tests for a source tree).

libarvwrap.so, the preloaded shim: shim.c (the hooks), env.c (env repair), match.c
(the rules matcher, shared with Python through cffi) and sys.c (the libc string
functions it defines itself, so its load and pass-through paths never reach libc).

arv-wrap-client runs once per redirected call, so it is linked statically: with
musl where musl-gcc is installed, else with the system's static libc, else
dynamically. musl first because a static glibc program spends about 0.28 ms of
every start probing the CPU with cpuid, which traps to the hypervisor in a VM
(bench/bench_start.py measures it). Its only NSS use, getpwuid, is a fallback for
a missing $HOME. arv-wrap-helper stays dynamic: its --exec needs the shim
preloaded, and its --relay resolves host names.

`python csrc/native.py [--sanitize] OUT_DIR` builds all three into OUT_DIR;
--sanitize builds them with AddressSanitizer and UndefinedBehaviorSanitizer
(see sanitized_flags) for tests/test_sanitized.py.
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-fvisibility=hidden", "-D_GNU_SOURCE"]
COMMON = [os.path.join(HERE, "common", "common.c")]
PROGRAMS = {
    "arv-wrap-client": sorted(glob.glob(os.path.join(HERE, "client", "*.c"))) + COMMON,
    "arv-wrap-helper": sorted(glob.glob(os.path.join(HERE, "helper", "*.c"))) + COMMON,
}
STATIC = {"arv-wrap-client"}

SHIM = "libarvwrap.so"
SHIM_SOURCES = [os.path.join(HERE, n) for n in ("shim.c", "env.c", "match.c", "sys.c")]
# Every process of a pipeline loads the shim, so its load cost is paid per exec:
# two LOAD segments instead of four, and no RELRO mprotect, measured at about
# 0.04 of a fork+exec of /bin/true (bench/bench_exec.py). Its few GOT entries stay
# writable either way under lazy binding.
SHIM_LDFLAGS = ["-Wl,-z,noseparate-code", "-Wl,-z,norelro",
                # No crt files: their weak undefined symbols (_ITM_*, __gmon_start__,
                # __cxa_finalize) cost every process failed lookups; the constructor
                # runs from .init_array without them.
                "-nostartfiles"]
# The shim defines its own (hidden) string functions (sys.c) so that nothing on its
# load or pass-through path goes through the PLT: keep gcc from turning their loops
# back into calls to themselves.
SHIM_CFLAGS = ["-fno-tree-loop-distribute-patterns"]


def sources():
    """Every file the programs are built from (for staleness checks)."""
    return [f for d in ("client", "helper", "common", ".")
            for f in glob.glob(os.path.join(HERE, d, "*.[ch]"))]


def _compile(command, target, quiet=False):
    tmp = f"{target}.{os.getpid()}.tmp"
    subprocess.check_call(command + ["-o", tmp],
                          stderr=subprocess.DEVNULL if quiet else None)
    os.replace(tmp, target)   # a running copy is never written to


def build(out_dir, cc=None, sanitize=False):
    """Compile the shim, the client and the helper into out_dir (each written
    atomically); with sanitize, the sanitized build (sanitized_flags)."""
    cc = shlex.split(cc or os.environ.get("CC", "cc"))
    os.makedirs(out_dir, exist_ok=True)
    extra, extra_srcs = sanitized_flags(out_dir) if sanitize else ([], [])
    _compile(cc + CFLAGS + extra + SHIM_CFLAGS + SHIM_LDFLAGS + ["-fPIC", "-shared"]
             + SHIM_SOURCES + extra_srcs, os.path.join(out_dir, SHIM))
    for name, srcs in PROGRAMS.items():
        target = os.path.join(out_dir, name)
        tail = CFLAGS + extra + srcs + extra_srcs
        if name in STATIC and not sanitize and _static(tail, target, cc):
            continue
        _compile(cc + tail, target)


def _static(tail, target, cc):
    """Link it statically with the best compiler that can; False if none can."""
    for compiler in static_compilers(cc):
        try:
            _compile(compiler + tail + ["-static"], target, quiet=True)
            return True
        except subprocess.CalledProcessError:
            pass
    return False


def static_compilers(cc):
    """The compilers to try for a static program, best first."""
    musl = shutil.which("musl-gcc")
    return ([[musl]] if musl and not os.environ.get("CC") else []) + [cc]


def sanitized_flags(out_dir):
    """Compiler flags and extra sources of the sanitized build.

    What works with gcc 12 (libasan.so.8, libubsan.so.1) for a preloaded library:
    - everything is linked dynamically against the sanitizer runtimes (there is no
      static ASan for a shared library, and a static client cannot have it either);
    - the shim is preloaded alone, as always: libasan comes in as its DT_NEEDED,
      after the program's own libraries, so ASan's "runtime does not come first"
      check is turned off (verify_asan_link_order=0). ASan's interceptors then do
      not see the program's malloc (nor does the shim use any); the shim's and the
      client's own code is fully instrumented (stack, globals, UB);
    - the options are compiled in (sanitize_opts.c: __asan_default_options,
      __ubsan_default_options), because the programs the shim is loaded into may
      run with an environment rebuilt from scratch (env -i): halt on the first
      error, and log to OUT_DIR/san.<pid>, which the test reads afterwards;
    - libubsan ignores log_path beside libasan: its reports reach the log through
      its monitor hook (__ubsan_on_report, sanitize_opts.c);
    - a hook that ran in a vfork child leaves ASan's stack poison in the parent's
      stack: the hooks are not instrumented and unpoison the stack below them
      first (shim.c, HOOK_ENTRY);
    - leak checking is off: the client's buffers live until it exits or execs by
      design.
    """
    log = os.path.join(os.path.abspath(out_dir), "san")
    return (["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-fno-sanitize-recover=all", f'-DAW_SAN_LOG="{log}"'],
            [os.path.join(HERE, "sanitize_opts.c")])


if __name__ == "__main__":
    args = sys.argv[1:]
    sanitize = "--sanitize" in args
    args = [a for a in args if a != "--sanitize"]
    if len(args) != 1:
        sys.exit("usage: native.py [--sanitize] OUT_DIR")
    build(args[0], sanitize=sanitize)
