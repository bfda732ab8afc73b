/* The shim's environment repair (env.h). */
#include "env.h"
#include "sys.h"

/* Does the LD_PRELOAD value list the shim?  ld.so splits it on ':' and ' '. */
static int lists_shim(const struct aw_envcfg *cfg, const char *value)
{
    for (const char *p = value; *p;) {
        size_t n = strcspn(p, ": ");
        if (n == cfg->shim_len && memcmp(p, cfg->shim, n) == 0)
            return 1;
        p += n;
        if (*p)
            p++;
    }
    return 0;
}

void aw_scan_env(const struct aw_envcfg *cfg, char *const *envp, struct aw_envscan *s)
{
    s->n = 0;
    s->disabled = 0;
    s->preload = NULL;
    s->has_shim = 0;
    s->missing = cfg->nkeep ? (uint32_t)((1ull << cfg->nkeep) - 1) : 0;
    for (char *const *e = envp; *e; e++, s->n++) {
        if (starts_with(*e, "LD_PRELOAD=")) {     /* ld.so reads the last one */
            s->preload = e;
            s->has_shim = lists_shim(cfg, *e + 11);
        }
        if (!starts_with(*e, "ARV_WRAP_"))
            continue;
        if (strcmp(*e, "ARV_WRAP_DISABLE=1") == 0)
            s->disabled = 1;
        size_t n = name_len(*e);
        for (int k = 0; k < cfg->nkeep; k++)
            if (name_len(cfg->keep[k]) == n && strncmp(cfg->keep[k], *e, n) == 0)
                s->missing &= ~(1u << k);
    }
}

size_t aw_preload_size(const struct aw_envcfg *cfg, const struct aw_envscan *s)
{
    if (s->has_shim)
        return 0;
    return 11 + cfg->shim_len + 1 + (s->preload ? strlen(*s->preload + 11) : 0) + 1;
}

char *aw_make_preload(const struct aw_envcfg *cfg, const struct aw_envscan *s, char *buf,
                      size_t size)
{
    size_t len = 0;
    const char *old = s->preload ? *s->preload + 11 : "";

    append(buf, size, &len, "LD_PRELOAD=", 11);
    append(buf, size, &len, cfg->shim, cfg->shim_len);
    if (*old) {
        append(buf, size, &len, ":", 1);
        append(buf, size, &len, old, strlen(old));
    }
    return buf;
}

size_t aw_repaired_slots(const struct aw_envcfg *cfg, const struct aw_envscan *s)
{
    size_t n = s->n + 2;
    for (int k = 0; k < cfg->nkeep; k++)
        n += (s->missing >> k) & 1;
    return n;
}

char *const *aw_repair_env(const struct aw_envcfg *cfg, char *const *envp,
                           const struct aw_envscan *s, char **out, char *preload,
                           size_t preload_len)
{
    size_t n = 0;

    for (char *const *e = envp; *e; e++)
        out[n++] = (e == s->preload && preload_len) ? preload : *e;
    if (!s->preload && preload_len)
        out[n++] = preload;
    for (int k = 0; k < cfg->nkeep; k++)
        if (s->missing & (1u << k))
            out[n++] = (char *)cfg->keep[k];
    out[n] = NULL;
    return out;
}
