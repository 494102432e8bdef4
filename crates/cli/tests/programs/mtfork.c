/* fork while another thread keeps writing a buffer, pass after pass, each
 * pass stamping every 4 KiB page with its pass number. A fork's copy is a
 * snapshot: the child sees passes g+1 then g along the buffer, never a
 * spread of more than one pass or a later pass after an earlier one. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
#define PAGES 16384 /* 64 MiB */
static volatile long *buf;
static volatile int run = 1;
static void *writer(void *a) {
    (void)a;
    for (long gen = 1; run; gen++)
        for (long i = 0; i < PAGES; i++) buf[i * 512] = gen;
    return NULL;
}
int main(void) {
    buf = calloc(PAGES, 4096);
    pthread_t t;
    pthread_create(&t, NULL, writer, NULL);
    int bad = 0;
    for (int k = 0; k < 10; k++) {
        usleep(20000);
        pid_t p = fork();
        if (p == 0) {
            long first = buf[0], last = buf[(PAGES - 1) * 512];
            int ok = first - last <= 1 && first >= last;
            for (long i = 1; i < PAGES && ok; i++)
                ok = buf[i * 512] <= buf[(i - 1) * 512];
            _exit(ok ? 0 : 1);
        }
        int st;
        waitpid(p, &st, 0);
        bad += WEXITSTATUS(st) != 0;
    }
    run = 0;
    pthread_join(t, NULL);
    printf("forks whose copy was not a snapshot: %d of 10\n", bad);
    return 0;
}
