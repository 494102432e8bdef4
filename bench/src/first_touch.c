/* first_touch: mmap SIZE bytes (default 1 GiB) anonymous private memory,
 * write one byte per 4 KiB page, then munmap.
 * Prints: mmap_touch_s=<s> mmap_s=<s> touch_s=<s> munmap_s=<s> bytes=<n>
 * mmap_touch_s is the figure of merit (mmap + first touch). Natively the
 * cost is in the page faults of the touch loop; under lwk the memory is
 * memfd-backed and pre-faulted (MAP_POPULATE) inside mmap, so the cost moves
 * into mmap and touching is cheap. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/mman.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t size = argc > 1 ? (size_t)atoll(argv[1]) : ((size_t)1 << 30);
    const size_t page = 4096;
    double t0 = now_s();
    unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    double t1 = now_s();
    for (size_t off = 0; off < size; off += page) p[off] = (unsigned char)(off >> 12);
    double t2 = now_s();
    /* read back a few bytes so the stores cannot be considered dead */
    unsigned long check = 0;
    for (size_t off = 0; off < size; off += page * 4099) check += p[off];
    double t3 = now_s();
    if (munmap(p, size) != 0) {
        perror("munmap");
        return 3;
    }
    double t4 = now_s();
    printf("mmap_touch_s=%.6f mmap_s=%.6f touch_s=%.6f munmap_s=%.6f bytes=%zu check=%lu\n",
           t2 - t0, t1 - t0, t2 - t1, t4 - t3, size, check);
    return 0;
}
