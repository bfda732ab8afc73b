/* The rules matcher (docs/internals.md, section 2; choices in match.h).
 *
 * The rules text is never copied or decoded into a buffer: patterns and items
 * are read in place, %XX sequences decoded byte by byte while comparing.
 * Globs run as a set of pattern positions advanced one subject byte at a time
 * (an NFA): time O(subject * pattern), no recursion, no backtracking blow-up
 * on patterns like "*a*a*a*b", and a fixed 1 KiB of stack.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "match.h"

/* ---- text as written: a pattern or item, %-encoded (rules) or plain ---- */

struct text {
    const char *s;
    size_t len;     /* bytes as written */
    int enc;        /* 1: %XX sequences stand for one byte */
};

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* The byte at offset i, decoded; *w receives how many bytes it was written with.
 * Escapes are complete here: the rules were validated before anything is read. */
static unsigned char byte_at(const struct text *t, size_t i, size_t *w)
{
    if (t->enc && t->s[i] == '%') {
        *w = 3;
        return (unsigned char)(hexval(t->s[i + 1]) * 16 + hexval(t->s[i + 2]));
    }
    *w = 1;
    return (unsigned char)t->s[i];
}

/* If the decoded text is a prefix of s, the rest of s after it; else NULL. */
static const char *match_prefix(const struct text *t, const char *s)
{
    size_t i = 0, w;
    while (i < t->len) {
        if (*s == '\0' || (unsigned char)*s != byte_at(t, i, &w))
            return NULL;
        s++;
        i += w;
    }
    return s;
}

/* ---- glob tokens ---- */

enum tok_kind { T_LIT, T_ONE, T_CLASS, T_STAR, T_STARSTAR };

struct tok {
    enum tok_kind kind;
    unsigned char byte;     /* T_LIT */
    int negate;             /* T_CLASS */
    size_t first, close;    /* T_CLASS: offsets of the first member and of the closing ']' */
};

/* Parse a class whose '[' ends at offset i; return the offset after its ']',
 * or 0 if it is never closed (then the '[' is a literal). */
static size_t parse_class(const struct text *p, size_t i, struct tok *t)
{
    size_t w;
    unsigned char c;

    t->negate = 0;
    if (i < p->len) {
        c = byte_at(p, i, &w);
        if (c == '!' || c == '^') {
            t->negate = 1;
            i += w;
        }
    }
    t->first = i;
    if (i < p->len && byte_at(p, i, &w) == ']')
        i += w;                             /* ']' first is a member */
    while (i < p->len) {
        c = byte_at(p, i, &w);
        if (c == ']') {
            t->close = i;
            return i + w;
        }
        i += w;
        if (c == '\\' && i < p->len) {
            byte_at(p, i, &w);
            i += w;
        }
    }
    return 0;
}

/* Read the token at offset i into *t; return the offset of the next one. */
static size_t next_tok(const struct text *p, size_t i, struct tok *t)
{
    size_t w, w2;
    unsigned char c = byte_at(p, i, &w);
    size_t after;

    switch (c) {
    case '*':
        if (i + w < p->len && byte_at(p, i + w, &w2) == '*') {
            t->kind = T_STARSTAR;
            return i + w + w2;
        }
        t->kind = T_STAR;
        return i + w;
    case '?':
        t->kind = T_ONE;
        return i + w;
    case '[':
        after = parse_class(p, i + w, t);
        if (after) {
            t->kind = T_CLASS;
            return after;
        }
        break;
    case '\\':
        if (i + w < p->len) {
            t->kind = T_LIT;
            t->byte = byte_at(p, i + w, &w2);
            return i + w + w2;
        }
        break;
    }
    t->kind = T_LIT;
    t->byte = c;
    return i + w;
}

/* One member byte of a class at offset *i, honouring a '\' escape. */
static unsigned char class_byte(const struct text *p, size_t *i, size_t close)
{
    size_t w;
    unsigned char c = byte_at(p, *i, &w);
    *i += w;
    if (c == '\\' && *i < close) {
        c = byte_at(p, *i, &w);
        *i += w;
    }
    return c;
}

static int class_has(const struct text *p, const struct tok *t, unsigned char c)
{
    size_t i = t->first, w;

    while (i < t->close) {
        unsigned char lo = class_byte(p, &i, t->close), hi = lo;
        if (i < t->close && byte_at(p, i, &w) == '-' && i + w < t->close) {
            i += w;
            hi = class_byte(p, &i, t->close);
        }
        if (c >= lo && c <= hi)
            return 1;
    }
    return 0;
}

/* ---- glob as a set of pattern positions (bit i = "at offset i") ---- */

#define SET_WORDS ((AW_PAT_MAX + 1 + 63) / 64)

static void set_add(uint64_t *set, size_t i)
{
    set[i / 64] |= (uint64_t)1 << (i % 64);
}

static int set_has(const uint64_t *set, size_t i)
{
    return (set[i / 64] >> (i % 64)) & 1;
}

/* A star may match nothing: whoever stands before one also stands after it.
 * Stars only lead forward, so one ascending pass reaches the fixpoint. */
static void close_stars(const struct text *p, uint64_t *set, size_t words)
{
    struct tok t;

    for (size_t wi = 0; wi < words; wi++) {
        uint64_t bits = set[wi];
        while (bits) {
            size_t i = wi * 64 + (size_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (i >= p->len)
                continue;
            size_t j = next_tok(p, i, &t);
            if (t.kind != T_STAR && t.kind != T_STARSTAR)
                continue;
            set_add(set, j);
            if (j / 64 == wi)
                bits |= (uint64_t)1 << (j % 64);   /* not visited yet: j > i */
        }
    }
}

/* Advance every position of cur over subject byte c into nxt; 1 if any survives. */
static int step(const struct text *p, const uint64_t *cur, uint64_t *nxt,
                size_t words, unsigned char c)
{
    struct tok t;
    int any = 0;

    memset(nxt, 0, words * sizeof *nxt);
    for (size_t wi = 0; wi < words; wi++) {
        uint64_t bits = cur[wi];
        while (bits) {
            size_t i = wi * 64 + (size_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (i >= p->len)
                continue;                   /* the end accepts no more bytes */
            size_t j = next_tok(p, i, &t);
            int to = -1;                    /* -1: dies, 0: stays at i, 1: moves to j */
            switch (t.kind) {
            case T_LIT:      to = c == t.byte ? 1 : -1; break;
            case T_ONE:      to = c != '/' ? 1 : -1; break;
            case T_CLASS:    to = c != '/' && class_has(p, &t, c) != t.negate ? 1 : -1; break;
            case T_STAR:     to = c != '/' ? 0 : -1; break;
            case T_STARSTAR: to = 0; break;
            }
            if (to >= 0) {
                set_add(nxt, to ? j : i);
                any = 1;
            }
        }
    }
    close_stars(p, nxt, words);
    return any;
}

static int glob_text(const struct text *p, const char *subject)
{
    uint64_t a[SET_WORDS], b[SET_WORDS];
    uint64_t *cur = a, *nxt = b, *tmp;
    size_t words;

    if (p->len > AW_PAT_MAX)
        return 0;
    words = p->len / 64 + 1;
    memset(cur, 0, words * sizeof *cur);
    set_add(cur, 0);
    close_stars(p, cur, words);
    for (const unsigned char *s = (const unsigned char *)subject; *s; s++) {
        if (!step(p, cur, nxt, words, *s))
            return 0;
        tmp = cur, cur = nxt, nxt = tmp;
    }
    return set_has(cur, p->len);
}

int aw_glob(const char *pattern, const char *subject)
{
    struct text p = { pattern, strlen(pattern), 0 };
    return glob_text(&p, subject);
}

/* ---- the rules text ---- */

/* Bytes the compiler must have %-encoded (besides the delimiters that end a field). */
static int must_encode(unsigned char c)
{
    return c <= 0x20 || c >= 0x7f || c == '%' || c == ',' || c == '=' || c == ':';
}

/* Skip one field (pattern: in_list 0, or item: in_list 1) starting at s.
 * Return where it ends (at ';', '|', NUL, or for an item ','), NULL if malformed. */
static const char *skip_field(const char *s, int in_list)
{
    for (;;) {
        unsigned char c = (unsigned char)*s;
        if (c == '\0' || c == ';' || c == '|' || (in_list && c == ','))
            return s;
        if (c == '%') {
            if (hexval(s[1]) < 0 || hexval(s[2]) < 0)
                return NULL;
            s += 3;
        } else if (must_encode(c)) {
            return NULL;
        } else {
            s++;
        }
    }
}

struct rule {
    char kind;              /* 'n' or 'p' */
    struct text pat;
    const char *conds;      /* at the first '|' or at the rule's end */
};

/* Parse the rule starting at s; return where it ends (';' or NUL), NULL if malformed. */
static const char *parse_rule(const char *s, struct rule *r)
{
    const char *e;

    if ((s[0] != 'n' && s[0] != 'p') || s[1] != ':')
        return NULL;
    r->kind = s[0];
    e = skip_field(s + 2, 0);
    if (!e || (size_t)(e - (s + 2)) > AW_PAT_MAX)
        return NULL;
    r->pat.s = s + 2;
    r->pat.len = (size_t)(e - (s + 2));
    r->pat.enc = 1;
    r->conds = e;
    while (*e == '|') {
        if ((e[1] != 's' && e[1] != 'x') || e[2] != '=')
            return NULL;
        e += 3;
        for (;;) {
            e = skip_field(e, 1);
            if (!e)
                return NULL;
            if (*e != ',')
                break;
            e++;
        }
    }
    return e;
}

/* Where the rules after the version start (';' or NUL), NULL if not version 1. */
static const char *rules_body(const char *rules)
{
    if (!rules || rules[0] != '1' || (rules[1] != ';' && rules[1] != '\0'))
        return NULL;
    return rules + 1;
}

int aw_rule_count(const char *rules)
{
    const char *p = rules_body(rules);
    struct rule r;
    int n = 0;

    if (!p)
        return -1;
    while (*p == ';') {
        p = parse_rule(p + 1, &r);
        if (!p)
            return -1;
        n++;
    }
    return n;
}

int aw_has_path_rules(const char *rules)
{
    const char *p = rules_body(rules);
    struct rule r;

    if (aw_rule_count(rules) < 0)
        return 0;
    while (*p == ';') {
        p = parse_rule(p + 1, &r);
        if (r.kind == 'p')
            return 1;
    }
    return 0;
}

/* Does any item of the list [s, end-of-condition) accept arg?
 * prefix_ok: also accept arg = ITEM "=" anything (for x=). */
static int any_item(const char *s, const char *arg, int prefix_ok)
{
    for (;;) {
        const char *e = skip_field(s, 1);
        struct text item = { s, (size_t)(e - s), 1 };
        const char *rest = match_prefix(&item, arg);
        if (rest && (*rest == '\0' || (prefix_ok && *rest == '=')))
            return 1;
        if (*e != ',')
            return 0;
        s = e + 1;
    }
}

static int check_conds(const char *c, char *const argv[])
{
    int argc = 0;

    while (argv && argv[argc])
        argc++;
    while (*c == '|') {
        char kind = c[1];
        const char *items = c + 3;
        if (kind == 's') {
            if (argc < 2 || !any_item(items, argv[1], 0))
                return AW_NO_SUBCOMMAND;
        } else {
            for (int i = 1; i < argc; i++)
                if (any_item(items, argv[i], 1))
                    return AW_HAS_NOT_FLAG;
        }
        /* to the next condition: skip the items */
        c = items;
        for (;;) {
            c = skip_field(c, 1);
            if (*c != ',')
                break;
            c++;
        }
    }
    return AW_OK;
}

static int check_rule(const struct rule *r, const char *name, const char *path,
                      char *const argv[])
{
    const char *subject = r->kind == 'n' ? name : path;

    if (!subject || !glob_text(&r->pat, subject))
        return AW_NO_PATTERN;
    return check_conds(r->conds, argv);
}

int aw_check_rule(const char *rules, int index, const char *name, const char *path,
                  char *const argv[])
{
    const char *p = rules_body(rules);
    struct rule r;

    if (index < 0 || index >= aw_rule_count(rules))
        return AW_BAD_RULES;
    for (int i = 0; *p == ';'; i++) {
        p = parse_rule(p + 1, &r);
        if (i == index)
            return check_rule(&r, name, path, argv);
    }
    return AW_BAD_RULES;    /* not reached: index was checked */
}

int aw_match(const char *rules, const char *name, const char *path, char *const argv[])
{
    const char *p = rules_body(rules);
    struct rule r;

    if (aw_rule_count(rules) < 0)
        return -1;
    for (int i = 0; *p == ';'; i++) {
        p = parse_rule(p + 1, &r);
        if (check_rule(&r, name, path, argv) == AW_OK)
            return i;
    }
    return -1;
}
