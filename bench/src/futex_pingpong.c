/* futex_pingpong N: two threads hand a token back and forth N/10 times
 * through a futex word (FUTEX_WAIT / FUTEX_WAKE, no spinning), timing one
 * round trip: two wakes and two waits. Under lwk futex is local. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>
#include <sys/syscall.h>
#include "syscall_loop.h"

static _Atomic int word; /* 0: ping's turn, 1: pong's turn */
static long rounds;

static void wait_for(int v) {
    int cur;
    while ((cur = atomic_load(&word)) != v) syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, cur, NULL, NULL, 0);
}

static void hand_to(int v) {
    atomic_store(&word, v);
    syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void *pong(void *arg) {
    for (long i = 0; i < rounds; i++) {
        wait_for(1);
        hand_to(0);
    }
    return arg;
}

static long ping(void) {
    hand_to(1);
    wait_for(0);
    return 1;
}

int main(int argc, char **argv) {
    long n = iterations(argc, argv) / 10 + 1, r;
    /* TIME_CALLS runs n/10+1 warm-up rounds, n timed ones and one more. */
    rounds = n / 10 + 1 + n + 1;
    pthread_t t;
    pthread_create(&t, NULL, pong, NULL);
    double ns;
    TIME_CALLS(n, ping(), &ns, &r);
    pthread_join(t, NULL);
    report(ns, n, r);
    return 0;
}
