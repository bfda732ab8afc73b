/* The shim's environment repair (csrc/env.c).
 *
 * Programs that rebuild the environment (`env -i`, runners passing only PATH)
 * would drop the interception: every hooked exec puts the shim back into
 * LD_PRELOAD (other preload entries kept, the shim first) and re-adds the
 * ARV_WRAP_* entries the process started with whose names are missing.  With
 * several LD_PRELOAD entries, the last is the one ld.so reads, so that is the
 * one checked and repaired (fuzz/fuzz_env.c found the first one was).
 *
 * Pure functions of their arguments: no allocation, no syscalls, string
 * functions only, so they are vfork-safe and can be fuzzed on their own
 * (fuzz/fuzz_env.c).  The caller provides every buffer, sized by aw_scan_env
 * and aw_preload_size.
 */
#ifndef ARVWRAP_ENV_H
#define ARVWRAP_ENV_H

#include <stddef.h>
#include <stdint.h>

#define AW_MAX_KEEP 32          /* ARV_WRAP_* entries re-added by env repair */

/* What the process started with (filled by the shim's constructor). */
struct aw_envcfg {
    const char *shim;           /* absolute path of the shim */
    size_t shim_len;
    const char *keep[AW_MAX_KEEP];  /* "ARV_WRAP_*=..." entries */
    int nkeep;
};

/* One pass over an exec's envp. */
struct aw_envscan {
    size_t n;                   /* entries */
    int disabled;               /* ARV_WRAP_DISABLE=1 present */
    char *const *preload;       /* the last LD_PRELOAD entry (the one ld.so reads), or NULL */
    int has_shim;               /* ... and it lists the shim */
    uint32_t missing;           /* bit k: the name of cfg->keep[k] is absent */
};

void aw_scan_env(const struct aw_envcfg *cfg, char *const *envp, struct aw_envscan *s);

/* Bytes needed for the repaired "LD_PRELOAD=..." entry (with its NUL), 0 if none
 * is needed (the last LD_PRELOAD entry lists the shim already). */
size_t aw_preload_size(const struct aw_envcfg *cfg, const struct aw_envscan *s);

/* "LD_PRELOAD=<shim>[:<old value>]" into buf (size from aw_preload_size). */
char *aw_make_preload(const struct aw_envcfg *cfg, const struct aw_envscan *s, char *buf,
                      size_t size);

/* Slots out needs: s->n + 1 (LD_PRELOAD) + the missing keep entries + 1 (NULL). */
size_t aw_repaired_slots(const struct aw_envcfg *cfg, const struct aw_envscan *s);

/* envp with the repairs into out (aw_repaired_slots entries): every entry of envp
 * in order, the last LD_PRELOAD replaced by preload (if preload_len), or preload
 * appended when there was none; then the missing keep entries; then NULL. */
char *const *aw_repair_env(const struct aw_envcfg *cfg, char *const *envp,
                           const struct aw_envscan *s, char **out, char *preload,
                           size_t preload_len);

#endif
