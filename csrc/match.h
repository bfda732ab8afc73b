/* The rules matcher of arv-wrap (docs/internals.md, section 2).
 *
 * The same code decides in the shim (inside exec hooks, possibly in a vfork
 * child) and in Python (through cffi, as arvwrap._match), so `arv-wrap check`
 * and the real run can never disagree.  Every function is pure: no
 * allocation, no locks, no libc beyond string/memory functions, bounded stack.
 *
 * Details the grammar leaves open, fixed here:
 *  - A rules text is malformed (aw_rule_count -1, aw_match -1, aw_check_rule
 *    AW_BAD_RULES) if anything in it is: a version other than "1", an empty
 *    rule, a kind other than n/p, an unknown condition, a bad %XX escape, a raw
 *    byte that must be %-encoded, or a PATTERN longer than AW_PAT_MAX bytes as
 *    written.  One bad rule rejects the whole text: a partial reading could
 *    redirect what the author excluded.
 *  - Hex digits of %XX may be upper or lower case.
 *  - `?`, `*` and a `[...]` class never match `/`; only `**` crosses it.
 *  - An unclosed `[` is a literal `[`; a trailing `\` is a literal `\`;
 *    `\x` also escapes inside a class.
 *  - name or path NULL never matches "n" / "p" rules; argv NULL is empty.
 */
#ifndef ARVWRAP_MATCH_H
#define ARVWRAP_MATCH_H

#define AW_OK 0
#define AW_NO_PATTERN 1
#define AW_NO_SUBCOMMAND 2
#define AW_HAS_NOT_FLAG 3
#define AW_BAD_RULES (-1)

/* Longest pattern (in bytes as written, %XX counting 3) the matcher accepts. */
#define AW_PAT_MAX 4096

/* Index of the first rule that matches, or -1 (none, or malformed rules). */
int aw_match(const char *rules, const char *name, const char *path, char *const argv[]);

/* Why rule `index` does or does not match: AW_OK, AW_NO_PATTERN,
 * AW_NO_SUBCOMMAND (an s= failed), AW_HAS_NOT_FLAG (an x= failed), or
 * AW_BAD_RULES (malformed rules or index out of range).  Conditions are
 * checked in the order written; the first failing one is reported. */
int aw_check_rule(const char *rules, int index, const char *name, const char *path,
                  char *const argv[]);

/* Number of rules, or -1 if malformed. */
int aw_rule_count(const char *rules);

/* 1 if the (well-formed) rules contain a "p" rule, else 0. */
int aw_has_path_rules(const char *rules);

/* 1 if subject matches the glob pattern (not %-encoded), else 0. */
int aw_glob(const char *pattern, const char *subject);

#endif
