/* A program that is frozen and resumed many times while it runs (tests/freeze.rs).
 * Its threads sit where a freeze must reach them: one waits on a condition
 * variable (a futex wait in the LWK), one sleeps in short nanosleeps, one
 * blocks in read() on a pipe (a delegated call), and the main thread
 * computes with floating point. Its output depends only on the work, so
 * a run under lwk that is frozen many times must print what a native run
 * prints. Prints "ready" first, "done" when its threads are joined.
 * The main thread also forks a child and waits for it in wait4 for 300 ms.
 * With the argument "vfork", it first vforks a child that sleeps for 3 s
 * before it exits: the parent waits for it where no signal reaches it. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int finished;
static int pipefd[2];
/* On the heap, for a checkpoint's memory to be searched for. */
char *volatile marker;

static void *waiter(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    while (!finished)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return (void *)1;
}

static void *sleeper(void *arg) {
    long n = 0;
    (void)arg;
    struct timespec ts = {0, 1000000};
    for (int i = 0; i < 1000; i++) {
        nanosleep(&ts, NULL);
        n += i;
    }
    return (void *)n;
}

static void *reader(void *arg) {
    unsigned long sum = 0, count = 0;
    unsigned char buf[64];
    ssize_t r;
    (void)arg;
    while ((r = read(pipefd[0], buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < r; i++)
            sum = sum * 31 + buf[i];
        count += r;
    }
    printf("reader: %lu bytes, sum %lu\n", count, sum);
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t t[3];
    marker = strdup("freeze-target heap marker 7f3a");
    if (pipe(pipefd) != 0)
        return 1;
    pthread_create(&t[0], NULL, waiter, NULL);
    pthread_create(&t[1], NULL, sleeper, NULL);
    pthread_create(&t[2], NULL, reader, NULL);
    printf("ready\n");
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "vfork") == 0) {
        pid_t c = vfork();
        if (c == 0) {
            struct timespec ts = {3, 0};
            nanosleep(&ts, NULL);
            _exit(8);
        }
        int st = 0;
        waitpid(c, &st, 0);
        printf("vfork child: %d\n", WEXITSTATUS(st));
    }
    pid_t c = fork();
    if (c == 0) {
        struct timespec ts = {0, 300000000};
        nanosleep(&ts, NULL);
        _exit(7);
    }
    int st = 0;
    waitpid(c, &st, 0);
    printf("child: %d\n", WEXITSTATUS(st));
    double x = 1.0, y = 0.5;
    for (int round = 0; round < 800; round++) {
        for (int i = 0; i < 20000; i++) {
            x = x * 1.0000001 + y * 1e-9;
            y = y * 0.9999999 + x * 1e-9;
        }
        unsigned char b = (unsigned char)(round * 7);
        if (write(pipefd[1], &b, 1) != 1)
            return 2;
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    close(pipefd[1]);
    pthread_mutex_lock(&mu);
    finished = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    void *r0, *r1;
    pthread_join(t[0], &r0);
    pthread_join(t[1], &r1);
    pthread_join(t[2], NULL);
    printf("waiter %ld sleeper %ld math %.9f %.9f\ndone\n", (long)r0, (long)r1, x, y);
    return 0;
}
