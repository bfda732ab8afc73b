/* The fuzz targets' input format: NUL-separated fields, each its own heap copy of
 * exactly its length (plus the NUL), so ASan sees any read past one. */
#ifndef ARVWRAP_FUZZ_FIELDS_H
#define ARVWRAP_FUZZ_FIELDS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Up to max fields of data into field[]; returns how many (at least 1). */
static size_t split_fields(const uint8_t *data, size_t size, char **field, size_t max)
{
    size_t nf = 0, start = 0;
    for (size_t i = 0; i <= size && nf < max; i++)
        if (i == size || data[i] == '\0') {
            char *s = malloc(i - start + 1);
            memcpy(s, data + start, i - start);
            s[i - start] = '\0';
            field[nf++] = s;
            start = i + 1;
        }
    return nf;
}

static void free_fields(char **field, size_t nf)
{
    for (size_t i = 0; i < nf; i++)
        free(field[i]);
}

#endif
