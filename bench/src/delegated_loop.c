/* delegated_loop: N calls of syscall(SYS_fcntl, fd, F_GETFD) on a /dev/null fd.
 * getppid is handled locally by the LWK (see `lwk syscalls`), so it does not
 * measure delegation; fcntl needs the fd table, which lives in the proxy, so
 * under lwk every call is a full delegated round trip (trap, request on the
 * shared ring, proxy worker executes it, reply). Natively it is one of the
 * cheapest fd system calls. Prints: ns_per_op=<float> iters=<n> result=<flags>
 * Timing uses clock_gettime(CLOCK_MONOTONIC), a vDSO call (not trapped). */
#define _GNU_SOURCE
#include <fcntl.h>
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
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        perror("open /dev/null");
        return 2;
    }
    volatile long sink = 0;
    long warm = n / 10 + 1;
    for (long i = 0; i < warm; i++) sink += syscall(SYS_fcntl, fd, F_GETFD);
    double t0 = now_ns();
    for (long i = 0; i < n; i++) sink += syscall(SYS_fcntl, fd, F_GETFD);
    double t1 = now_ns();
    long r = syscall(SYS_fcntl, fd, F_GETFD);
    if (r != FD_CLOEXEC) {
        fprintf(stderr, "fcntl(F_GETFD) returned %ld, expected FD_CLOEXEC\n", r);
        return 3;
    }
    printf("ns_per_op=%.1f iters=%ld result=%ld\n", (t1 - t0) / (double)n, n, r);
    close(fd);
    return sink == 42 ? 1 : 0;
}
