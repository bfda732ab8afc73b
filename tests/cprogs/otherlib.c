/* A second LD_PRELOAD library: proves it was loaded by setting a variable. */
#include <stdlib.h>

__attribute__((constructor)) static void other_init(void)
{
    setenv("ARVTEST_OTHER_LOADED", "1", 1);
}
