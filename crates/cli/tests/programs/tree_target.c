// A parent and the child it forked, talking through two pipes, adding up
// in shared anonymous memory, and signalling each other: what a process
// tree must keep through a checkpoint, a restore or a migration. The
// parent sends numbers two ahead (so the pipe to the child usually holds
// bytes), checks every answer, and at the end reaps the child (exit 7)
// and checks what they shared. Prints "ready" once the child exists.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define N 40

static volatile sig_atomic_t usr1;
static void on_usr1(int s) {
    (void)s;
    usr1++;
}

int main(int argc, char **argv) {
    int pause_us = argc > 1 ? atoi(argv[1]) : 25000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGUSR1, on_usr1);
    volatile long *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) return 2;
    int down[2], up[2];
    if (pipe(down) || pipe(up)) return 3;
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) return 4;
    if (child == 0) {
        close(down[1]);
        close(up[0]);
        for (int i = 0; i < N; i++) {
            int v;
            if (read(down[0], &v, sizeof v) != sizeof v) _exit(90);
            if (getppid() != parent) _exit(91);
            shared[0] += v;
            shared[1] = getpid();
            int r = v * 2;
            if (write(up[1], &r, sizeof r) != sizeof r) _exit(92);
            if (i == N - 5) kill(getppid(), SIGUSR1);
        }
        _exit(7);
    }
    close(down[0]);
    close(up[1]);
    printf("ready\n");
    int sent = 0;
    for (; sent < 2; sent++)
        if (write(down[1], &sent, sizeof sent) != sizeof sent) return 5;
    for (int i = 0; i < N; i++) {
        int r;
        if (read(up[0], &r, sizeof r) != sizeof r) {
            printf("step %d: the child's answer did not come\n", i);
            return 1;
        }
        if (r != i * 2) printf("step %d: got %d\n", i, r);
        if (sent < N) {
            if (write(down[1], &sent, sizeof sent) != sizeof sent) return 6;
            sent++;
        }
        if (i % 10 == 9) printf("step %d\n", i + 1);
        usleep(pause_us);
    }
    int status = 0;
    pid_t w = waitpid(child, &status, 0);
    printf("reaped %s, exit %d\n", w == child ? "the child" : "something else",
           WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    printf("shared sum %ld of %d, the child's pid %s\n", shared[0], N * (N - 1) / 2,
           shared[1] == child ? "as forked" : "differs");
    printf("pid %s, SIGUSR1 %d\n", getpid() == parent ? "the same" : "differs", (int)usr1);
    return 0;
}
