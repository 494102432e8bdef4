/* thread_create N: create and join N/100 threads one after the other
 * (N is the common micro-benchmark count; thread creation is ~100x dearer
 * than a system call). Under lwk each creation also starts a proxy worker
 * for the new thread's channel and each exit ends it. */
#define _GNU_SOURCE
#include <pthread.h>
#include "syscall_loop.h"

static void *noop(void *arg) { return arg; }

static long create_join(void) {
    pthread_t t;
    void *r = 0;
    if (pthread_create(&t, NULL, noop, (void *)1) || pthread_join(t, &r)) return -1;
    return (long)r;
}

int main(int argc, char **argv) {
    long n = iterations(argc, argv) / 100 + 1, r;
    double ns;
    TIME_CALLS(n, create_join(), &ns, &r);
    report(ns, n, r);
    return r == 1 ? 0 : 3;
}
