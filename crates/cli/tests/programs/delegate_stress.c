/* delegate_stress N: many delegated calls separated by busy pauses of
 * 0 to 15 microseconds (computing, no system call) and by sleeps, so that
 * the proxy's spin budget runs out at every possible moment relative to the
 * next request and every wait and wake-up path of the delegation channel is
 * crossed many times. Run under lwk with a spin budget in that range
 * (LWK_SPIN_CYCLES) it finds lost wake-ups as hangs. Prints a checksum that
 * does not depend on timing. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: not a system call */
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 20000;
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int p[2];
    if (null < 0 || pipe(p)) { perror("setup"); return 1; }
    unsigned long sum = 0;
    char buf[64];
    for (long i = 0; i < n; i++) {
        sum += (unsigned long)fcntl(null, F_GETFD);
        double until = now_us() + (double)(i % 16);
        while (now_us() < until) {
        }
        if (i % 97 == 0) {
            int len = snprintf(buf, sizeof buf, "%ld\n", i);
            if (write(p[1], buf, len) != len || read(p[0], buf, sizeof buf) != len) { perror("pipe"); return 1; }
            sum = sum * 31 + strtoul(buf, NULL, 10);
        }
        if (i % 1000 == 999) {
            struct timespec ts = {0, 200000}; /* 0.2 ms: the proxy goes to sleep */
            nanosleep(&ts, NULL);
        }
    }
    printf("calls=%ld sum=%lu\n", n, sum);
    return 0;
}
