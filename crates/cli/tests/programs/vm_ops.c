/* mremap growth keeping contents, mprotect, munmap of a middle page, and
 * brk growth and shrink through sbrk. Prints each step's outcome. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int check(const unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 13 + seed)) return 0;
    return 1;
}

static void fill(unsigned char *p, size_t from, size_t n, unsigned seed) {
    for (size_t i = from; i < n; i++) p[i] = (unsigned char)(i * 13 + seed);
}

int main(void) {
    const size_t page = sysconf(_SC_PAGESIZE);
    int ok = 1;

    /* mremap: grow 4 KiB -> 64 MiB, doubling, allowed to move. */
    size_t len = page;
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    fill(p, 0, len, 1);
    while (len < (64u << 20)) {
        size_t nlen = len * 2;
        unsigned char *q = mremap(p, len, nlen, MREMAP_MAYMOVE);
        if (q == MAP_FAILED) { perror("mremap"); return 1; }
        if (!check(q, len, 1)) { printf("mremap to %zu lost contents\n", nlen); ok = 0; }
        fill(q, len, nlen, 1);
        p = q;
        len = nlen;
    }
    printf("mremap grew to %zu MiB, contents kept: %s\n", len >> 20, ok ? "yes" : "no");
    /* Shrink in place. */
    unsigned char *s = mremap(p, len, len / 4, 0);
    printf("mremap shrink in place: %s, contents kept: %s\n", s == p ? "same address" : "moved",
           s != MAP_FAILED && check(s, len / 4, 1) ? "yes" : "no");
    len /= 4;

    /* mprotect read-only then back, contents unchanged. */
    int r1 = mprotect(p, len, PROT_READ);
    unsigned sum = 0;
    for (size_t i = 0; i < len; i += page) sum += p[i];
    int r2 = mprotect(p, len, PROT_READ | PROT_WRITE);
    printf("mprotect ro=%d rw=%d sum=%u contents kept: %s\n", r1, r2, sum, check(p, len, 1) ? "yes" : "no");

    /* munmap of a middle page: the pages around it stay. */
    int r3 = munmap(p + 5 * page, page);
    int around = check(p, 5 * page, 1);
    for (size_t i = 6 * page; i < 7 * page; i++)
        if (p[i] != (unsigned char)(i * 13 + 1)) around = 0;
    printf("munmap middle=%d pages around kept: %s\n", r3, around ? "yes" : "no");
    /* mmap MAP_FIXED back into the hole gets zeroes. */
    unsigned char *h = mmap(p + 5 * page, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    int zero = h == p + 5 * page;
    for (size_t i = 0; zero && i < page; i++) zero = h[i] == 0;
    printf("refill hole: %s\n", zero ? "zeroed at same address" : "wrong");
    printf("munmap all=%d\n", munmap(p, len));

    /* brk through sbrk: grow in steps, write, shrink back. */
    char *base = sbrk(0);
    int grew = 1;
    for (int i = 1; i <= 64; i++) {
        char *prev = sbrk(64 * 1024);
        if (prev == (void *)-1) { grew = 0; break; }
        memset(prev, i, 64 * 1024);
    }
    char *top = sbrk(0);
    int kept = 1;
    for (int i = 0; i < 64; i++)
        if (base[i * 64 * 1024] != i + 1 || base[i * 64 * 1024 + 65535] != i + 1) kept = 0;
    printf("sbrk grew: %s by %ld KiB, contents kept: %s\n", grew ? "yes" : "no", (long)(top - base) / 1024,
           kept ? "yes" : "no");
    char *r = sbrk(-(intptr_t)(top - base) / 2);
    printf("sbrk shrink returned old top: %s, now %ld KiB above start\n", r == top ? "yes" : "no",
           (long)((char *)sbrk(0) - base) / 1024);
    /* Growing again after a shrink must give zeroed memory. */
    char *again = sbrk(0);
    sbrk(64 * 1024);
    int zeroed = 1;
    for (int i = 0; i < 64 * 1024; i++)
        if (again[i] != 0) zeroed = 0;
    printf("regrown brk zeroed: %s\n", zeroed ? "yes" : "no");
    sbrk(-(intptr_t)((char *)sbrk(0) - base));
    printf("sbrk back at start: %s\n", sbrk(0) == base ? "yes" : "no");
    return 0;
}
