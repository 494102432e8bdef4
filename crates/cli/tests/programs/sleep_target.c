// One sleep of MS milliseconds (nanosleep, or clock_nanosleep with "clock"
// as the second argument) between "ready" and how long it took, in ms,
// by CLOCK_MONOTONIC.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 2000;
    int use_clock = argc > 2 && strcmp(argv[2], "clock") == 0;
    struct timespec req = {ms / 1000, (ms % 1000) * 1000000L};
    printf("ready\n");
    fflush(stdout);
    long long t0 = now_ms();
    int r = use_clock ? clock_nanosleep(CLOCK_REALTIME, 0, &req, NULL) : nanosleep(&req, NULL);
    printf("slept %lld ms, returned %d\n", now_ms() - t0, r);
    return 0;
}
