/* Prints its arguments and one environment variable, then exercises malloc
 * at sizes from a few bytes to well past glibc's mmap threshold (> 2 MiB),
 * grows a buffer with realloc while checking its contents, and writes a
 * checksum of everything to stdout with write(2). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

int main(int argc, char **argv) {
    printf("argc=%d\n", argc);
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    const char *v = getenv("LWK_TEST_VAR");
    printf("LWK_TEST_VAR=%s\n", v ? v : "(unset)");

    static const size_t sizes[] = {1, 7, 24, 100, 1000, 4096, 65536, 131072, 200000,
                                   1 << 20, (2 << 20) + 1, 3 << 20, 8 << 20, 33 << 20};
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        unsigned char *p = malloc(n);
        if (!p) { printf("malloc(%zu) failed\n", n); return 1; }
        for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 31 + k);
        h = fnv(h, p, n < 4096 ? n : 4096);
        h = fnv(h, p + n - 1, 1);
        printf("malloc(%zu) ok\n", n);
        free(p);
    }

    /* Many small live allocations, freed in a different order. */
    void *live[1000];
    for (int i = 0; i < 1000; i++) { live[i] = malloc(16 + i * 8); memset(live[i], i & 0xff, 16 + i * 8); }
    for (int i = 0; i < 1000; i += 2) free(live[i]);
    for (int i = 1; i < 1000; i += 2) {
        unsigned char *q = live[i];
        if (q[0] != (i & 0xff) || q[16 + i * 8 - 1] != (i & 0xff)) { printf("corrupt %d\n", i); return 1; }
        free(q);
    }

    /* realloc growth from 16 bytes to 64 MiB, the old contents must stay. */
    size_t cap = 16;
    unsigned char *buf = malloc(cap);
    for (size_t i = 0; i < cap; i++) buf[i] = (unsigned char)(i * 7);
    while (cap < (64u << 20)) {
        size_t ncap = cap * 2;
        buf = realloc(buf, ncap);
        if (!buf) { printf("realloc(%zu) failed\n", ncap); return 1; }
        for (size_t i = 0; i < cap; i += 4093)
            if (buf[i] != (unsigned char)(i * 7)) { printf("realloc lost data at %zu of %zu\n", i, ncap); return 1; }
        for (size_t i = cap; i < ncap; i++) buf[i] = (unsigned char)(i * 7);
        cap = ncap;
    }
    h = fnv(h, buf, 4096);
    free(buf);
    printf("realloc grew to %zu\n", cap);
    fflush(stdout);

    char line[64];
    int n = snprintf(line, sizeof line, "hash=%016llx\n", (unsigned long long)h);
    if (write(1, line, n) != n) return 1;
    return 0;
}
