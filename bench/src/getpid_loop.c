/* getpid_loop: N calls of syscall(SYS_getpid).
 * Under lwk getpid is handled locally: trap (SIGSYS via Syscall User
 * Dispatch) into the in-process LWK and back, no proxy. Natively a plain
 * kernel entry (syscall(2) directly: no glibc caching). Prints ns_per_op=...
 * Timing uses clock_gettime(CLOCK_MONOTONIC), a vDSO call (not trapped). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    if (n <= 0) n = 1;
    volatile long sink = 0;
    long warm = n / 10 + 1;
    for (long i = 0; i < warm; i++) sink += syscall(SYS_getpid);
    double t0 = now_ns();
    for (long i = 0; i < n; i++) sink += syscall(SYS_getpid);
    double t1 = now_ns();
    printf("ns_per_op=%.1f iters=%ld result=%ld\n", (t1 - t0) / (double)n, n, (long)syscall(SYS_getpid));
    return sink == 42 ? 1 : 0; /* keep sink live */
}
