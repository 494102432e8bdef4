/* Memory (and connections) to migrate (bench/migrate.py).
 *
 *   memhog MiB SECONDS [RATE [ADDR PORT CONNS]]
 *
 * Writes MiB of memory with a known pattern and prints "ready"; with ADDR,
 * it then listens on ADDR:PORT, accepts CONNS connections and prints
 * "connected". For SECONDS seconds it then writes RATE MiB/s of its memory
 * (one word per 4 KiB page, rewriting the value it holds, so the pages are
 * dirtied and the pattern holds; one word every 10 ms when RATE is 0) and
 * echoes whatever a connection sends; SIGUSR1 ends that early. At the end
 * it checks the whole pattern and prints "ok" or "bad N". */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_usr1(int sig) {
    (void)sig;
    stop = 1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4 && argc != 7)
        return 2;
    uint64_t words = (uint64_t)atoi(argv[1]) << 17;
    int seconds = atoi(argv[2]);
    double rate = argc > 3 ? atof(argv[3]) : 0;
    signal(SIGUSR1, on_usr1);
    volatile uint64_t *m = malloc(words * 8);
    if (!m)
        return 3;
    for (uint64_t i = 0; i < words; i++)
        m[i] = i * 0x9E3779B97F4A7C15ull;
    printf("ready\n");
    fflush(stdout);
    int nconn = 0;
    struct pollfd *fds = NULL;
    if (argc == 7) {
        nconn = atoi(argv[6]);
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[5]))};
        inet_pton(AF_INET, argv[4], &a.sin_addr);
        if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096))
            return 4;
        fds = calloc(nconn, sizeof *fds);
        for (int i = 0; i < nconn; i++) {
            fds[i].fd = accept(l, NULL, NULL);
            if (fds[i].fd < 0)
                return 5;
            fds[i].events = POLLIN;
        }
        close(l);
        printf("connected\n");
        fflush(stdout);
    }
    /* Pages to dirty per 10 ms tick. */
    uint64_t per_tick = rate > 0 ? (uint64_t)(rate * 256 / 100) : 0;
    uint64_t pages = words / 512, next = 0;
    double end = now() + seconds;
    char buf[4096];
    while (now() < end && !stop) {
        if (per_tick) {
            for (uint64_t k = 0; k < per_tick; k++, next = (next + 7919) % pages)
                m[next * 512] = m[next * 512];
        } else {
            uint64_t w = (next++ * 7919) % words;
            m[w] ^= 1; /* flip and flip back: the pattern holds at the end */
            m[w] ^= 1;
        }
        if (nconn) {
            if (poll(fds, nconn, 10) > 0)
                for (int i = 0; i < nconn; i++)
                    if (fds[i].revents & POLLIN) {
                        ssize_t n = read(fds[i].fd, buf, sizeof buf);
                        if (n > 0 && write(fds[i].fd, buf, n) != n)
                            return 6;
                    }
        } else {
            struct timespec ts = {0, 10000000};
            nanosleep(&ts, NULL);
        }
    }
    uint64_t bad = 0;
    for (uint64_t i = 0; i < words; i++)
        bad += m[i] != i * 0x9E3779B97F4A7C15ull;
    if (bad)
        printf("bad %lu\n", (unsigned long)bad);
    else
        printf("ok\n");
    return 0;
}
