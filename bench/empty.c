/* An empty libc-linked library: what any LD_PRELOAD costs (the floor). */
int arv_wrap_bench_empty;
