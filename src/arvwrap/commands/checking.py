"""Asking without running: `arv-wrap check`, `doctor`, `preload-path`."""
import math
import os
import shutil

from arvwrap import backends, elf, paths, whitelist
from arvwrap.backends.base import DESCRIPTOR_ARG
from arvwrap.activation import load_rules
from arvwrap.errors import UsageError


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
        for note in [oversize_note(rule, argv_b, backend, env),
                     *capability_notes(rule, argv_b, whitelist.choose_backend(rule, backend, env))]:
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


def capability_notes(rule, argv, name):
    """What the backend's declared capabilities change for this call."""
    cls = backends.find_quietly(name)
    if cls is None:
        return []
    cpus = whitelist.resources(rule, argv)[0]
    notes = []
    if not cls.fractional_cpus and cpus != int(cpus):
        notes.append(f"the {name} backend grants whole CPUs: {cpus:g} CPUs get "
                     f"{math.ceil(cpus)}")
    if not cls.carries_descriptors and any(DESCRIPTOR_ARG.search(a) for a in argv[1:]):
        notes.append(f"an argument names one of the caller's descriptors (/dev/fd/N), "
                     f"which {cls.job_noun} cannot reach: runs on the local backend")
    return notes


def oversize_note(rule, argv, backend, env):
    """What on_oversize will do with a request larger than the backend offers."""
    name = whitelist.choose_backend(rule, backend, env)
    try:
        most_cpus, most_memory = backends.load(name, env).largest()
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
