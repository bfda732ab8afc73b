/* libFuzzer target: the shim's environment repair (csrc/env.c) on arbitrary bytes.
 *
 * Input: NUL-separated fields. The first is the shim's path; then the kept
 * entries up to an empty field, each given "ARV_WRAP_" in front (as the
 * constructor keeps only those, at most AW_MAX_KEEP); the rest is the exec's envp. Every string and every buffer is its
 * own heap block of exactly the size the API asks for, so ASan sees any overrun.
 * The repaired envp must:
 *  - end with NULL in the last slot aw_repaired_slots counted, no sooner or later;
 *  - keep every entry of envp in order, the LD_PRELOAD one replaced when needed;
 *  - have an LD_PRELOAD entry that ld.so reads (the last one) listing the shim
 *    first, followed by the old value, unless that entry listed the shim already;
 *  - contain every kept entry's name.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "fields.h"

#define MAX_FIELDS 512

static size_t name_len(const char *e)
{
    const char *eq = strchr(e, '=');
    return eq ? (size_t)(eq - e) : strlen(e);
}

static int has_name(char *const *env, const char *entry)
{
    size_t n = name_len(entry);
    for (; *env; env++)
        if (name_len(*env) == n && strncmp(*env, entry, n) == 0)
            return 1;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *field[MAX_FIELDS];
    size_t nf = split_fields(data, size, field, MAX_FIELDS);
    struct aw_envcfg cfg = {.shim = field[0], .shim_len = strlen(field[0])};
    size_t f = 1;
    char *kept[AW_MAX_KEEP];
    for (; f < nf && field[f][0] && cfg.nkeep < AW_MAX_KEEP; f++) {
        size_t len = strlen(field[f]);
        char *k = kept[cfg.nkeep] = malloc(9 + len + 1);
        memcpy(k, "ARV_WRAP_", 9);
        memcpy(k + 9, field[f], len + 1);
        cfg.keep[cfg.nkeep++] = k;
    }
    if (f < nf && !field[f][0])
        f++;
    size_t n = nf - f;
    char **envp = malloc((n + 1) * sizeof *envp);
    memcpy(envp, field + f, n * sizeof *envp);
    envp[n] = NULL;

    struct aw_envscan s;
    aw_scan_env(&cfg, envp, &s);
    if (s.n != n)
        abort();
    size_t pre_len = aw_preload_size(&cfg, &s);
    char *pre = pre_len ? malloc(pre_len) : NULL;
    if (pre_len)
        aw_make_preload(&cfg, &s, pre, pre_len);
    size_t slots = aw_repaired_slots(&cfg, &s);
    char **out = malloc(slots * sizeof *out);
    char *const *rep = aw_repair_env(&cfg, envp, &s, out, pre, pre_len);
    size_t m = 0, want = n + (!s.preload && pre_len);
    while (rep[m])
        m++;
    for (int k = 0; k < cfg.nkeep; k++)
        want += (s.missing >> k) & 1;
    if (m != want || m + 1 > slots)
        abort();                    /* every entry, and within the slots counted */

    /* envp's entries, in order, with the ld.so-visible LD_PRELOAD replaced */
    for (size_t i = 0; i < n; i++)
        if (rep[i] != envp[i] && !(envp + i == s.preload && rep[i] == pre))
            abort();
    if (pre_len) {
        const char *want_old = s.preload ? *s.preload + 11 : "";
        if (strlen(pre) >= pre_len)
            abort();
        if (strncmp(pre, "LD_PRELOAD=", 11) || strncmp(pre + 11, cfg.shim, cfg.shim_len))
            abort();
        const char *rest = pre + 11 + cfg.shim_len;
        if (*want_old ? (*rest != ':' || strcmp(rest + 1, want_old)) : *rest)
            abort();
    }
    /* the last LD_PRELOAD entry is the one ld.so reads: it must list the shim */
    const char *last = NULL;
    for (size_t i = 0; rep[i]; i++)
        if (!strncmp(rep[i], "LD_PRELOAD=", 11))
            last = rep[i] + 11;
    if (!last || (!s.has_shim && strncmp(last, cfg.shim, cfg.shim_len)))
        abort();
    for (int k = 0; k < cfg.nkeep; k++)
        if (!has_name(rep, cfg.keep[k]))
            abort();

    for (int k = 0; k < cfg.nkeep; k++)
        free(kept[k]);
    free(out);
    free(pre);
    free(envp);
    free_fields(field, nf);
    return 0;
}
