"""Where arv-wrap's files live: the state dir, the whitelists of a run, the native
artifacts, the socket."""
import os
import stat

NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native")
SHIM = os.path.join(NATIVE, "libarvwrap.so")
CLIENT = os.path.join(NATIVE, "arv-wrap-client")   # what the shim execs for a call
HELPER = os.path.join(NATIVE, "arv-wrap-helper")   # --exec, and the Slurm relay and launcher


def state_dir(env=os.environ):
    """The state dir as the C client computes it (docs/internals.md, section 4)."""
    if env.get("ARV_WRAP_STATE_DIR"):
        return os.path.abspath(env["ARV_WRAP_STATE_DIR"])
    if env.get("XDG_STATE_HOME"):
        return os.path.join(env["XDG_STATE_HOME"], "arv-wrap")
    return os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "state", "arv-wrap")


# Printed by the caller after "arv-wrap: ", which then exits 2.
NO_WHITELIST_MESSAGE = (
    "no whitelist: name one with -w FILE (repeatable), or set "
    "ARV_WRAP_WHITELIST=FILE[:FILE...], or create ./arv-wrap.yaml"
)


def find_whitelists(cli_paths, env=os.environ) -> list:
    """-w files, else $ARV_WRAP_WHITELIST (colon-separated), else ./arv-wrap.yaml, else []."""
    if cli_paths:
        chosen = list(cli_paths)
    elif env.get("ARV_WRAP_WHITELIST"):
        chosen = [p for p in env["ARV_WRAP_WHITELIST"].split(":") if p]
    elif os.path.exists("arv-wrap.yaml"):
        chosen = ["arv-wrap.yaml"]
    else:
        chosen = []
    return [os.path.abspath(p) for p in chosen]


def private_dir(path):
    """Create path 0700 if missing; refuse one that another user could enter."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{path} must be owned by uid {os.getuid()} and mode 0700")
    return path


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def runtime_dir(env=os.environ):
    """$XDG_RUNTIME_DIR/arv-wrap when that directory is ours, else /tmp/arv-wrap-UID."""
    xdg = env.get("XDG_RUNTIME_DIR")
    try:
        if xdg and os.stat(xdg).st_uid == os.getuid():
            return os.path.join(xdg, "arv-wrap")
    except OSError:
        pass
    return f"/tmp/arv-wrap-{os.getuid()}"


def socket_path(env=os.environ):
    """The dispatcher's socket for this state dir (shared with csrc/client/connect.c)."""
    digest = fnv1a64(os.fsencode(state_dir(env)))
    return os.path.join(runtime_dir(env), f"{digest:016x}.sock")
