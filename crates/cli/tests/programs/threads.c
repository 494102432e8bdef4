/* threads MODE: pthreads under the LWK.
 *   stress:   8 threads, a mutex and a condition variable, a million
 *             operations in all; prints totals that do not depend on timing.
 *   blocking: one thread blocks in read() on a pipe while another thread
 *             keeps making system calls and finally writes to the pipe:
 *             one blocked call must not block the other thread.
 *   segv:     one thread of several dies of SIGSEGV: the process dies so. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 8
#define OPS 125000 /* per thread: a million in all */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static long counter, turns[THREADS];
static int turn;

static void *stress(void *arg) {
    long id = (long)arg;
    for (int i = 0; i < OPS; i++) {
        pthread_mutex_lock(&lock);
        counter += id + 1;
        if (i % 1000 == 0) {
            /* Take turns in order for a while: condition variable traffic. */
            while (turn != id) pthread_cond_wait(&cond, &lock);
            turns[id]++;
            turn = (turn + 1) % THREADS;
            pthread_cond_broadcast(&cond);
        }
        pthread_mutex_unlock(&lock);
    }
    return (void *)(id * id);
}

static int pipefd[2];

static void *reader(void *arg) {
    char buf[32] = {0};
    ssize_t n = read(pipefd[0], buf, sizeof buf - 1);
    printf("reader got %zd bytes: %s\n", n, buf);
    return arg;
}

static void *crasher(void *arg) {
    usleep(10000);
    volatile int *p = (int *)16;
    *p = 1;
    return arg;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "stress";
    pthread_t t[THREADS];
    if (!strcmp(mode, "stress")) {
        for (long i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, stress, (void *)i);
        long sum = 0;
        for (int i = 0; i < THREADS; i++) {
            void *r;
            pthread_join(t[i], &r);
            sum += (long)r;
        }
        long all_turns = 0;
        for (int i = 0; i < THREADS; i++) all_turns += turns[i];
        printf("counter=%ld joined=%ld turns=%ld\n", counter, sum, all_turns);
        return 0;
    }
    if (!strcmp(mode, "blocking")) {
        if (pipe(pipefd)) return 1;
        pthread_create(&t[0], NULL, reader, NULL);
        /* While the reader waits, this thread works through the proxy. */
        long calls = 0;
        for (int i = 0; i < 2000; i++) calls += getcwd((char[256]){0}, 256) != NULL;
        usleep(20000);
        if (write(pipefd[1], "hello", 5) != 5) return 1;
        pthread_join(t[0], NULL);
        printf("main made %ld calls while the reader was blocked\n", calls);
        return 0;
    }
    if (!strcmp(mode, "segv")) {
        pthread_create(&t[0], NULL, crasher, NULL);
        for (;;) pause();
    }
    return 2;
}
