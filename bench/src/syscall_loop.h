/* The timing loop shared by the system-call benchmarks: warm up with a
 * tenth of the iterations, time N calls with clock_gettime(CLOCK_MONOTONIC)
 * (a vDSO call, never trapped), print one line run.py reads:
 *   ns_per_op=<float> iters=<n> result=<last result> */
#ifndef SYSCALL_LOOP_H
#define SYSCALL_LOOP_H
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Iterations from argv[1], 1,000,000 by default. */
static long iterations(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    return n > 0 ? n : 1;
}

/* Time N evaluations of CALL: nanoseconds per call into *NS, the last
 * result into *RESULT. Makes no system call of its own. */
#define TIME_CALLS(N, CALL, NS, RESULT)                         \
    do {                                                        \
        volatile long sink_ = 0;                                \
        for (long i_ = 0; i_ < (N) / 10 + 1; i_++) sink_ += (CALL); \
        double t0_ = now_ns();                                  \
        for (long i_ = 0; i_ < (N); i_++) sink_ += (CALL);      \
        *(NS) = (now_ns() - t0_) / (double)(N);                 \
        *(RESULT) = (CALL);                                     \
        (void)sink_;                                            \
    } while (0)

static void report(double ns, long n, long result) {
    printf("ns_per_op=%.1f iters=%ld result=%ld\n", ns, n, result);
}

#endif
