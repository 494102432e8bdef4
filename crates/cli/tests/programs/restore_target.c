/* A program that is checkpointed while it runs and restored in a new
 * process (tests/checkpoint.rs). It holds 32 MiB written with a known
 * pattern, a thread waiting on a condition variable, a thread sleeping in
 * short nanosleeps and counting, and the main thread computing with
 * floating point between sleeps; nothing but standard output. Prints
 * "ready" first and "done" last; what it prints in between depends only on
 * the work, so a run checkpointed and restored halfway must print what a
 * native run prints. At the end it checks that its ids are those it had at
 * the start (getpid, getppid, gettid of two threads, /proc/self), and that
 * a signal to itself and one to a thread arrive. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define WORDS (32u << 20) / 8

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int finished;
static __thread long counted; /* thread-local: the FS base must come back */
static pid_t pid0, ppid0, main_tid0;
static volatile pid_t waiter_tid0;
static volatile int usr1_in_waiter, usr2_seen;

static void on_usr1(int sig) {
    (void)sig;
    usr1_in_waiter = gettid() == waiter_tid0;
}

static void on_usr2(int sig) {
    (void)sig;
    usr2_seen = 1;
}

/* The pid in /proc/self/stat: the /proc the program sees is its own. */
static pid_t proc_self_pid(void) {
    FILE *f = fopen("/proc/self/stat", "r");
    int pid = -1;
    if (f) {
        if (fscanf(f, "%d", &pid) != 1)
            pid = -1;
        fclose(f);
    }
    return pid;
}

static void *waiter(void *arg) {
    (void)arg;
    waiter_tid0 = gettid();
    pthread_mutex_lock(&mu);
    while (!finished)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return (void *)1;
}

static void *sleeper(void *arg) {
    (void)arg;
    struct timespec ts = {0, 1000000};
    for (int i = 0; i < 600; i++) {
        nanosleep(&ts, NULL);
        counted += i;
    }
    return (void *)counted;
}

int main(void) {
    pid0 = getpid();
    ppid0 = getppid();
    main_tid0 = gettid();
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    uint64_t *mem = malloc(WORDS * 8);
    for (uint64_t i = 0; i < WORDS; i++)
        mem[i] = i * 0x9E3779B97F4A7C15ull;
    pthread_t t[2];
    pthread_create(&t[0], NULL, waiter, NULL);
    pthread_create(&t[1], NULL, sleeper, NULL);
    printf("ready\n");
    fflush(stdout);
    double x = 1.0, y = 0.5;
    for (int round = 0; round < 400; round++) {
        for (int i = 0; i < 20000; i++) {
            x = x * 1.0000001 + y * 1e-9;
            y = y * 0.9999999 + x * 1e-9;
        }
        mem[(round * 4099) % WORDS] ^= (uint64_t)round;
        struct timespec ts = {0, 3000000};
        nanosleep(&ts, NULL);
        counted++;
    }
    int ids = getpid() == pid0 && getppid() == ppid0 && gettid() == main_tid0 && waiter_tid0 != 0;
    printf("ids %s\n", ids ? "kept" : "changed");
    printf("proc self %s\n", proc_self_pid() == getpid() ? "ok" : "wrong");
    pthread_kill(t[0], SIGUSR1);
    kill(getpid(), SIGUSR2);
    for (int i = 0; i < 1000 && !(usr1_in_waiter && usr2_seen); i++)
        usleep(1000);
    printf("signals %s\n", usr1_in_waiter && usr2_seen ? "ok" : "lost");
    pthread_mutex_lock(&mu);
    finished = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    void *r0, *r1;
    pthread_join(t[0], &r0);
    pthread_join(t[1], &r1);
    for (int round = 0; round < 400; round++)
        mem[(round * 4099) % WORDS] ^= (uint64_t)round;
    uint64_t bad = 0;
    for (uint64_t i = 0; i < WORDS; i++)
        bad += mem[i] != i * 0x9E3779B97F4A7C15ull;
    printf("waiter %ld sleeper %ld main %ld math %.9f %.9f\nbad words %lu\ndone\n", (long)r0, (long)r1, counted, x, y,
           (unsigned long)bad);
    return 0;
}
