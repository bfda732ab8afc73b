"""Why the execs a program makes cannot be intercepted, read from its file (pure
Python: the ELF headers, the mode bits).

The shim is loaded by ld.so from LD_PRELOAD and hooks libc's exec functions, so a
program's own execs escape it when
  - it has no program interpreter (PT_INTERP): statically linked, ld.so never runs;
  - it is setuid or setgid to someone else: ld.so runs in secure mode and ignores
    LD_PRELOAD (a setuid program run by its owner is not affected);
  - it is a Go program (a .go.buildinfo section or a Go build-id note): Go execs
    with raw system calls, never through libc.
A `#!` script is judged by its interpreter (one level).
"""
import os
import stat
import struct

PT_INTERP, PT_NOTE = 3, 4
NT_GO_BUILD_ID = 4
MAX_HEADERS = 4096           # program or section headers read at most
MAX_NOTES = 1 << 16          # bytes of a PT_NOTE segment read at most


class ElfInfo:
    def __init__(self, interp, go):
        self.interp = interp     # the PT_INTERP path (bytes), or None
        self.go = go             # a Go build: .go.buildinfo or a Go build-id note


def _read(f, offset, size):
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated")
    return data


def read_elf(path):
    """ElfInfo for an ELF file, None for anything else or a file it cannot read."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) \
                    or ident[5] not in (1, 2):
                return None
            return _parse(f, ident)
    except (OSError, ValueError, struct.error):
        return None


def _parse(f, ident):
    wide = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    if wide:
        phoff, shoff = struct.unpack_from(end + "QQ", ident, 32)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "HHHHH",
                                                                          ident, 54)
        ph = struct.Struct(end + "IIQQQQQQ")     # type, flags, offset, vaddr, paddr, filesz
        sh = struct.Struct(end + "IIQQQQIIQQ")   # name, type, flags, addr, offset, size
    else:
        phoff, shoff = struct.unpack_from(end + "II", ident, 28)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "HHHHH",
                                                                          ident, 42)
        ph = struct.Struct(end + "IIIIIIII")     # type, offset, vaddr, paddr, filesz
        sh = struct.Struct(end + "IIIIIIIIII")
    interp, go = None, False
    if phoff and phentsize >= ph.size:
        for i in range(min(phnum, MAX_HEADERS)):
            fields = ph.unpack(_read(f, phoff + i * phentsize, ph.size))
            if wide:
                p_type, offset, filesz = fields[0], fields[2], fields[5]
            else:
                p_type, offset, filesz = fields[0], fields[1], fields[4]
            if p_type == PT_INTERP:
                interp = _read(f, offset, min(filesz, 4096)).split(b"\0")[0]
            elif p_type == PT_NOTE:
                go = go or _go_note(_read(f, offset, min(filesz, MAX_NOTES)), end)
    if not go and shoff and shentsize >= sh.size and shstrndx < shnum:
        go = ".go.buildinfo" in _section_names(f, shoff, shentsize, shnum, shstrndx, sh, wide)
    return ElfInfo(interp, go)


def _go_note(data, end):
    """Does a note segment hold the Go build id (name "Go", type 4)?"""
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, kind = struct.unpack_from(end + "III", data, pos)
        name = data[pos + 12:pos + 12 + namesz]
        if kind == NT_GO_BUILD_ID and name.rstrip(b"\0") == b"Go":
            return True
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _section_names(f, shoff, shentsize, shnum, shstrndx, sh, wide):
    def header(i):
        fields = sh.unpack(_read(f, shoff + i * shentsize, sh.size))
        return fields[0], fields[4], fields[5]     # name offset, file offset, size
    _, stroff, strsize = header(shstrndx)
    strings = _read(f, stroff, min(strsize, 1 << 20))
    names = set()
    for i in range(min(shnum, MAX_HEADERS)):
        name = header(i)[0]
        names.add(strings[name:strings.find(b"\0", name)].decode("latin-1"))
    return names


def _interpreter(path):
    """The interpreter of a #! script, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n")[0].split()
    return os.fsdecode(words[0]) if words else None


def not_intercepted(path):
    """One line for each reason the execs made by the program at path escape the
    shim (empty: nothing known stops them)."""
    interp = _interpreter(path)
    if interp:
        return [f"{path} runs in {interp}: {line}" for line in not_intercepted(interp)] \
            if _interpreter(interp) is None else []
    reasons = []
    try:
        st = os.stat(path)
    except OSError:
        return []
    info = read_elf(path)
    if info is None:
        return []
    if info.interp is None:
        reasons.append(f"{path} is statically linked (no program interpreter): ld.so never "
                       "loads the shim into it, so the programs it execs are not intercepted")
    if info.go:
        reasons.append(f"{path} is a Go program: Go execs with raw system calls, not "
                       "through libc, so the programs it execs are not intercepted")
    for bit, kind, owner, mine in ((stat.S_ISUID, "setuid", st.st_uid, os.getuid()),
                                   (stat.S_ISGID, "setgid", st.st_gid, os.getgid())):
        if not st.st_mode & bit or (bit == stat.S_ISGID and not st.st_mode & stat.S_IXGRP):
            continue
        who = "uid" if bit == stat.S_ISUID else "gid"
        if owner != mine:
            reasons.append(f"{path} is {kind} ({who} {owner}): ld.so ignores LD_PRELOAD in "
                           "it (secure mode), so the programs it execs are not intercepted")
        else:
            reasons.append(f"{path} is {kind} ({who} {owner}): run with another {who} than "
                           f"{owner}, ld.so ignores LD_PRELOAD in it and the programs it "
                           "execs are not intercepted")
    return reasons
