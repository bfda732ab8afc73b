"""cffi builder: gives Python the very matcher the shim uses (csrc/match.c)."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef("""
    int aw_match(const char *rules, const char *name, const char *path, char *const argv[]);
    int aw_check_rule(const char *rules, int index, const char *name, const char *path,
                      char *const argv[]);
    int aw_rule_count(const char *rules);
    int aw_has_path_rules(const char *rules);
    int aw_glob(const char *pattern, const char *subject);
""")
ffibuilder.set_source(
    "arvwrap._match",
    '#include "match.h"',
    sources=[os.path.relpath(os.path.join(HERE, "match.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
