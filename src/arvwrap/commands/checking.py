"""Asking without running: `arv-wrap check`, `doctor`, `preload-path`."""
import os
import shutil

from arvwrap import backends, elf, paths, whitelist
from arvwrap.activation import UsageError, load_rules


def check(options, command):
    if not command:
        raise UsageError("check needs -- COMMAND [ARGS...] (see arv-wrap check --help)")
    env = dict(os.environ)
    _, rules = load_rules(options, env)
    argv_b = [os.fsencode(a) for a in command]
    resolved = shutil.which(command[0]) if "/" not in command[0] else command[0]
    path = os.fsencode(os.path.abspath(resolved)) if resolved else None
    name = os.path.basename(os.fsencode(command[0]))
    backend = options["backend"] or env.get("ARV_WRAP_BACKEND")
    print(whitelist.describe(rules, argv_b, name, path, backend=backend))
    rule = rules.match(argv_b, name, path)
    if rule:
        note = oversize_note(rule, argv_b, backend, env)
        if note:
            print(f"note: {note}")
    if rule and path:
        for line in backends.process_state(whitelist.choose_backend(rule, backend, env)):
            print(f"process state: {line}")
    if rule and path and options.get("reuse"):
        from arvwrap.commands.caching import check_reuse
        print("\n".join(check_reuse(rule, argv_b, path, env)))
    if resolved:
        for line in elf.not_intercepted(os.path.abspath(resolved)):
            print(f"not intercepted: {line}")
    return 0


def oversize_note(rule, argv, backend, env):
    """What on_oversize will do with a request larger than the backend offers."""
    name = whitelist.choose_backend(rule, backend, env)
    try:
        most_cpus, most_memory = backends.load(name, backends.config_from_env(env).get(name, {})
                                               ).largest()
    except Exception as e:   # check must still answer when the backend cannot
        return f"could not ask the {name} backend what it offers: {e}"
    cpus, memory, _, _ = whitelist.resources(rule, argv)
    over = [f"{cpus:g} CPUs > {most_cpus:g}"] if cpus > most_cpus else []
    if memory and memory > most_memory:
        over.append(f"{memory} bytes of memory > {most_memory}")
    if not over:
        return None
    action = ("refused with exit 125" if rule.on_oversize == "refuse"
              else "clamped to what it offers")
    return f"larger than the {name} backend offers ({', '.join(over)}): {action} (on_oversize)"


def doctor(options, words):
    from arvwrap import doctor as checks
    return checks.run(options, words)


def preload_path(_options, _words):
    print(paths.SHIM)
    return 0
