/* libFuzzer target: the rules matcher (csrc/match.c) on arbitrary bytes.
 *
 * Input: NUL-separated fields: rules, name, path, argv[0], argv[1], ... (a missing
 * field is NULL: no name, no path, empty argv). Each field is its own heap copy of
 * exactly its length, so ASan sees any read past it. Beyond not crashing, the
 * matcher must agree with itself:
 *  - aw_match returns -1 or an index below aw_rule_count, and -1 for malformed rules;
 *  - aw_check_rule says AW_OK for the rule aw_match picked and not AW_OK for every
 *    rule before it (first match wins); for no match, no rule is AW_OK;
 *  - aw_check_rule refuses out-of-range indexes;
 *  - aw_glob on (rules, name) and (name, path) answers 0 or 1, and a pattern
 *    without any special byte matches exactly itself.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "match.h"
#include "fields.h"

#define MAX_FIELDS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *field[MAX_FIELDS + 1] = {0};
    size_t nf = split_fields(data, size, field, MAX_FIELDS);
    const char *rules = field[0] ? field[0] : "";
    const char *name = nf > 1 ? field[1] : NULL;
    const char *path = nf > 2 ? field[2] : NULL;
    char **argv = nf > 3 ? field + 3 : NULL;     /* field[nf] is NULL */

    int count = aw_rule_count(rules);
    int has_path = aw_has_path_rules(rules);
    int m = aw_match(rules, name, path, argv);
    if (has_path != 0 && has_path != 1)
        abort();
    if (count < 0) {
        if (m != -1 || has_path != 0 || aw_check_rule(rules, 0, name, path, argv) != AW_BAD_RULES)
            abort();
    } else {
        if (m < -1 || m >= count)
            abort();
        if (aw_check_rule(rules, -1, name, path, argv) != AW_BAD_RULES ||
            aw_check_rule(rules, count, name, path, argv) != AW_BAD_RULES)
            abort();
        int limit = count < 256 ? count : 256;
        for (int i = 0; i < limit; i++) {
            int r = aw_check_rule(rules, i, name, path, argv);
            if (r < AW_OK || r > AW_HAS_NOT_FLAG)
                abort();
            if (i < m && r == AW_OK)
                abort();            /* an earlier rule matches: aw_match skipped it */
            if (i == m && r != AW_OK)
                abort();
            if (m == -1 && r == AW_OK)
                abort();
        }
    }
    int g1 = aw_glob(rules, name ? name : "");
    int g2 = aw_glob(name ? name : "", path ? path : "");
    if ((g1 != 0 && g1 != 1) || (g2 != 0 && g2 != 1))
        abort();
    if (name && !strpbrk(name, "*?[\\") && aw_glob(name, name) != 1)
        abort();

    free_fields(field, nf);
    return 0;
}
