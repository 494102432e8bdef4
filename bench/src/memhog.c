/* Memory to migrate (bench/migrate.py): MiB of memory written with a known
 * pattern, then a write of one word every 10 ms for SECONDS seconds, then
 * a check of the whole pattern. Prints "ready" once the memory is written
 * and "ok" or "bad N" at the end. Arguments: MiB SECONDS. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    uint64_t words = (uint64_t)atoi(argv[1]) << 17;
    int seconds = atoi(argv[2]);
    uint64_t *m = malloc(words * 8);
    if (!m)
        return 3;
    for (uint64_t i = 0; i < words; i++)
        m[i] = i * 0x9E3779B97F4A7C15ull;
    printf("ready\n");
    fflush(stdout);
    struct timespec ts = {0, 10000000};
    for (int i = 0; i < seconds * 100; i++) {
        uint64_t w = ((uint64_t)i * 7919) % words;
        m[w] ^= 1; /* flip and flip back: the pattern holds at the end */
        nanosleep(&ts, NULL);
        m[w] ^= 1;
    }
    uint64_t bad = 0;
    for (uint64_t i = 0; i < words; i++)
        bad += m[i] != i * 0x9E3779B97F4A7C15ull;
    if (bad)
        printf("bad %lu\n", (unsigned long)bad);
    else
        printf("ok\n");
    return 0;
}
