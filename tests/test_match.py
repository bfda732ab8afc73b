"""The rules matcher (csrc/match.c) through cffi: globs, %XX decoding, conditions,
precedence and malformed rules (docs/internals.md, section 2)."""
import random
import re

import pytest

from arvwrap._match import ffi, lib

AW_OK, AW_NO_PATTERN, AW_NO_SUBCOMMAND, AW_HAS_NOT_FLAG, AW_BAD_RULES = 0, 1, 2, 3, -1
PAT_MAX = 4096


def b(s):
    return s if isinstance(s, bytes) else s.encode()


def cstr(s):
    return ffi.NULL if s is None else b(s)


def argv_array(argv):
    """A NULL-terminated char *[] (the returned keepalive list must outlive the call)."""
    if argv is None:
        return ffi.NULL, []
    keep = [ffi.new("char[]", b(a)) for a in argv]
    return ffi.new("char *[]", keep + [ffi.NULL]), keep


def match(rules, name, path=None, argv=()):
    arr, _keep = argv_array(argv)
    return lib.aw_match(b(rules), cstr(name), cstr(path), arr)


def check(rules, index, name, path=None, argv=()):
    arr, _keep = argv_array(argv)
    return lib.aw_check_rule(b(rules), index, cstr(name), cstr(path), arr)


def glob(pattern, subject):
    return lib.aw_glob(b(pattern), b(subject))


# ---- globs ----

@pytest.mark.parametrize("pattern,subject,expected", [
    ("bwa", "bwa", 1),
    ("bwa", "bwa2", 0),             # the whole subject must match
    ("bwa", "xbwa", 0),
    ("", "", 1),
    ("", "a", 0),
    ("*", "", 1),
    ("*", "anything", 1),
    ("*", "a/b", 0),                # * stops at /
    ("samtools*", "samtools-1.17", 1),
    ("*tools", "samtools", 1),
    ("s*t*s", "samtools", 1),
    ("s*t*x", "samtools", 0),
    ("**", "a/b/c", 1),
    ("/usr/**", "/usr/bin/bwa", 1),
    ("/usr/*", "/usr/bin/bwa", 0),
    ("/usr/*/bwa", "/usr/bin/bwa", 1),
    ("/usr/*/bwa", "/usr/local/bin/bwa", 0),
    ("/usr/**/bwa", "/usr/local/bin/bwa", 1),
    ("/usr/**/bwa", "/usr/bwa", 0),  # ** is a run of bytes between the two slashes
    ("**/bwa", "/opt/x/bwa", 1),
    ("**a*b", "xa/ab", 1),          # needs ** to move past a first candidate for 'a'
    ("**/b*", "x/y/bcd", 1),
    ("**/b*", "x/b/cd", 0),
    ("?", "a", 1),
    ("?", "", 0),
    ("?", "/", 0),
    ("a?c", "abc", 1),
    ("a?c", "ac", 0),
    ("[abc]", "b", 1),
    ("[abc]", "d", 0),
    ("[a-c]x", "bx", 1),
    ("[a-c]x", "dx", 0),
    ("[!a-c]", "d", 1),
    ("[!a-c]", "a", 0),
    ("[^a-c]", "d", 1),
    ("[^a-c]", "b", 0),
    ("[]]", "]", 1),                # ] first is a member
    ("[]a]", "a", 1),
    ("[!]]", "]", 0),
    ("[!]]", "x", 1),
    ("[a-]", "-", 1),               # - last is a member
    ("[a-]", "b", 0),
    ("[/]", "/", 0),                # classes never match /
    ("[!a]", "/", 0),
    ("[\\]]", "]", 1),              # \ escapes inside a class
    ("[", "[", 1),                  # an unclosed [ is literal
    ("[ab", "[ab", 1),
    ("[]", "[]", 1),
    ("\\*", "*", 1),
    ("\\*", "a", 0),
    ("\\?", "?", 1),
    ("\\[a]", "[a]", 1),
    ("a\\", "a\\", 1),              # a trailing \ is literal
    ("\\\\", "\\", 1),
    ("***", "a/b", 1),              # ** then *
    ("a**", "a", 1),
])
def test_glob(pattern, subject, expected):
    assert glob(pattern, subject) == expected


def test_glob_bytes_are_bytes():
    assert glob(b"\xff*", b"\xff\xfe") == 1
    assert glob(b"?", b"\xc3") == 1          # one byte, not one character
    assert glob(b"?", "é".encode()) == 0


def test_glob_pathological_patterns_are_fast():
    subject = "a" * 3000 + "c"
    assert glob("*a" * 40 + "*b", subject) == 0
    assert glob("**a" * 40 + "**b", subject) == 0
    assert glob("**a" * 40 + "**c", subject) == 1


def test_glob_pattern_size_limit():
    assert glob("a" * PAT_MAX, "a" * PAT_MAX) == 1
    assert glob("a" * (PAT_MAX + 1), "a" * (PAT_MAX + 1)) == 0


def reference(pattern):
    """A regex with the documented semantics, for differential testing."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i + 1:i + 2] == "*":
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            neg = j < len(pattern) and pattern[j] in "!^"
            if neg:
                j += 1
            members, k = [], j
            if k < len(pattern) and pattern[k] == "]":
                members.append("]")
                k += 1
            while k < len(pattern) and pattern[k] != "]":
                if pattern[k] == "\\" and k + 1 < len(pattern):
                    k += 1
                members.append(pattern[k])
                k += 1
            if k >= len(pattern):
                out.append(re.escape(c))
            else:
                ranges, m = [], 0
                while m < len(members):
                    if m + 2 < len(members) and members[m + 1] == "-":
                        ranges.append((members[m], members[m + 2]))
                        m += 3
                    else:
                        ranges.append((members[m], members[m]))
                        m += 1
                body = "".join(re.escape(lo) + "-" + re.escape(hi) for lo, hi in ranges
                               if lo <= hi) or "\\x00-\\x00"
                out.append(("(?!/)[^" if neg else "(?!/)[") + body + "]")
                i = k
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


def test_glob_agrees_with_reference():
    rng = random.Random(1234)
    atoms = ["a", "b", "/", "*", "**", "?", "[ab]", "[!a]", "[a-b]", "\\*", "[]a]"]
    letters = "ab/*"
    for _ in range(4000):
        pattern = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 6)))
        subject = "".join(rng.choice(letters) for _ in range(rng.randint(0, 8)))
        expected = 1 if reference(pattern).fullmatch(subject) else 0
        assert glob(pattern, subject) == expected, (pattern, subject)


# ---- %XX encoding ----

def test_encoded_pattern_is_decoded_then_globbed():
    assert match("1;n:my%20tool", "my tool") == 0
    assert match("1;n:my%20tool", "my%20tool") == -1
    assert match("1;n:%2A", "anything") == 0          # %2A is a real *
    assert match("1;n:%5C%2A", "*") == 0              # \* is a literal *
    assert match("1;n:%5C%2A", "x") == -1
    assert match("1;n:a%3Ab%3Dc%2Cd%3Be%7Cf%25", "a:b=c,d;e|f%") == 0
    assert match("1;n:%ff%FE", b"\xff\xfe") == 0      # either case of hex
    assert match("1;p:/opt/x%0Ay/**", "t", "/opt/x\ny/bin/t") == 0


def test_encoded_items():
    rules = "1;n:t|s=a%20b,%2C|x=--f%3Dx"
    assert match(rules, "t", argv=["t", "a b"]) == 0
    assert match(rules, "t", argv=["t", ","]) == 0
    assert match(rules, "t", argv=["t", "a%20b"]) == -1
    assert check(rules, 0, "t", argv=["t", "a b", "--f=x"]) == AW_HAS_NOT_FLAG
    assert check(rules, 0, "t", argv=["t", "a b", "--f=x=1"]) == AW_HAS_NOT_FLAG
    assert check(rules, 0, "t", argv=["t", "a b", "--f"]) == AW_OK


# ---- conditions ----

def test_subcommand_condition():
    rules = "1;n:bwa|s=mem,aln"
    assert check(rules, 0, "bwa", argv=["bwa", "mem", "ref"]) == AW_OK
    assert check(rules, 0, "bwa", argv=["bwa", "aln"]) == AW_OK
    assert check(rules, 0, "bwa", argv=["bwa", "index", "mem"]) == AW_NO_SUBCOMMAND
    assert check(rules, 0, "bwa", argv=["bwa"]) == AW_NO_SUBCOMMAND
    assert check(rules, 0, "bwa", argv=["mem"]) == AW_NO_SUBCOMMAND   # argv[0] is not argv[1]
    assert check(rules, 0, "bwa", argv=["bwa", "memx"]) == AW_NO_SUBCOMMAND
    assert check(rules, 0, "bwa", argv=None) == AW_NO_SUBCOMMAND


def test_empty_item_matches_empty_argument():
    assert check("1;n:t|s=", 0, "t", argv=["t", ""]) == AW_OK
    assert check("1;n:t|s=", 0, "t", argv=["t", "x"]) == AW_NO_SUBCOMMAND


def test_not_flag_condition():
    rules = "1;n:samtools|x=--help,-h"
    assert check(rules, 0, "samtools", argv=["samtools", "sort", "x.bam"]) == AW_OK
    assert check(rules, 0, "samtools", argv=["samtools", "sort", "--help"]) == AW_HAS_NOT_FLAG
    assert check(rules, 0, "samtools", argv=["samtools", "--help=all"]) == AW_HAS_NOT_FLAG
    assert check(rules, 0, "samtools", argv=["samtools", "-h"]) == AW_HAS_NOT_FLAG
    assert check(rules, 0, "samtools", argv=["samtools", "--helpme"]) == AW_OK
    assert check(rules, 0, "samtools", argv=["samtools", "-hx"]) == AW_OK
    assert check(rules, 0, "samtools", argv=["--help"]) == AW_OK      # argv[0] is not checked
    assert check(rules, 0, "samtools", argv=None) == AW_OK


def test_conditions_checked_in_order_all_must_hold():
    rules = "1;n:t|s=run|x=--dry|s=run,go"
    assert check(rules, 0, "t", argv=["t", "run"]) == AW_OK
    assert check(rules, 0, "t", argv=["t", "go"]) == AW_NO_SUBCOMMAND
    assert check(rules, 0, "t", argv=["t", "run", "--dry"]) == AW_HAS_NOT_FLAG
    assert check("1;n:t|x=--dry|s=run", 0, "t", argv=["t", "go", "--dry"]) == AW_HAS_NOT_FLAG
    assert check(rules, 0, "u", argv=["u", "run"]) == AW_NO_PATTERN


def test_condition_failure_falls_to_next_rule():
    rules = "1;n:bwa|s=mem;n:bwa|x=--help;n:*"
    assert match(rules, "bwa", argv=["bwa", "mem"]) == 0
    assert match(rules, "bwa", argv=["bwa", "index"]) == 1
    assert match(rules, "bwa", argv=["bwa", "index", "--help"]) == 2


# ---- precedence, kinds ----

def test_first_matching_rule_wins():
    rules = "1;p:/opt/**;n:bwa;n:b*;n:*"
    assert match(rules, "bwa", "/opt/bin/bwa") == 0
    assert match(rules, "bwa", "/usr/bin/bwa") == 1
    assert match(rules, "bowtie", "/usr/bin/bowtie") == 2
    assert match(rules, "x", "/usr/bin/x") == 3


def test_path_rules_need_a_path():
    rules = "1;p:/opt/**;n:zzz"
    assert match(rules, "bwa", None) == -1
    assert check(rules, 0, "bwa", None) == AW_NO_PATTERN
    assert match(rules, "bwa", "/opt/bwa") == 0


def test_name_rules_match_the_name_not_the_path():
    assert match("1;n:bwa", "bwa", "/usr/bin/other") == 0
    assert match("1;n:bwa", "other", "/usr/bin/bwa") == -1
    assert match("1;n:bwa", None, "/usr/bin/bwa") == -1
    assert match("1;p:bwa", "bwa", "bwa") == 0          # p matches the path given


def test_no_rules():
    assert lib.aw_rule_count(b"1") == 0
    assert match("1", "bwa", "/usr/bin/bwa") == -1
    assert check("1", 0, "bwa") == AW_BAD_RULES


def test_rule_count_and_path_rules():
    assert lib.aw_rule_count(b"1;n:a;p:/b;n:c|s=x,y|x=z") == 3
    assert lib.aw_has_path_rules(b"1;n:a;p:/b") == 1
    assert lib.aw_has_path_rules(b"1;n:a;n:p") == 0
    assert lib.aw_has_path_rules(b"1") == 0
    assert lib.aw_has_path_rules(b"1;p:/x;q:bad") == 0


def test_check_rule_index_range():
    rules = "1;n:a;n:b"
    assert check(rules, 1, "b") == AW_OK
    assert check(rules, 0, "b") == AW_NO_PATTERN
    assert check(rules, 2, "b") == AW_BAD_RULES
    assert check(rules, -1, "b") == AW_BAD_RULES


# ---- malformed rules ----

@pytest.mark.parametrize("rules", [
    "", "0", "2;n:a", "1x", "12;n:a", "1;", "1;;n:a", "1;n:a;", "1;q:a", "1;n", "1;na",
    "1;n:a b", "1;n:a\tb", "1;n:a=b", "1;n:a:b", "1;n:a,b", "1;n:%G0", "1;n:%4", "1;n:a%",
    "1;n:a|y=b", "1;n:a|s", "1;n:a|s:b", "1;n:a|", "1;n:a|s=b c", "1;n:a|x=b=c",
    "1;n:a;p:/b;q:c", b"1;n:\x80", b"1;n:a\x7f", "1;n:" + "a" * (PAT_MAX + 1),
])
def test_malformed(rules):
    assert lib.aw_rule_count(b(rules)) == -1
    assert match(rules, "a", "/b", ["a", "b"]) == -1
    assert check(rules, 0, "a", "/b", ["a", "b"]) == AW_BAD_RULES


def test_one_bad_rule_rejects_all():
    assert match("1;n:a;n:b c", "a") == -1


def test_longest_pattern_accepted():
    rules = "1;n:" + "a" * PAT_MAX
    assert lib.aw_rule_count(b(rules)) == 1
    assert match(rules, "a" * PAT_MAX) == 0
    encoded = "1;n:" + "%41" * (PAT_MAX // 3)
    assert match(encoded, "A" * (PAT_MAX // 3)) == 0


def test_null_rules():
    assert lib.aw_rule_count(ffi.NULL) == -1
    assert lib.aw_match(ffi.NULL, b"a", ffi.NULL, ffi.NULL) == -1
