/* A service to migrate inside a single-IP cluster (tests/cluster.rs,
 * bench/cluster.py).
 *
 *   cluster_service ADDR TCP_PORT UDP_PORT MiB RATE
 *
 * Writes MiB of memory with a known pattern, listens on ADDR:TCP_PORT and
 * ADDR:UDP_PORT and prints "ready". Then, until a connection sends "end\n":
 * echoes whatever any TCP connection sends (any number of them) and every
 * datagram back to its sender, and rewrites RATE MiB/s of its memory (one
 * word per 4 KiB page, the value it holds, so the pages are dirtied and the
 * pattern holds; none when RATE is 0). At the end it checks its memory and
 * prints "ok" or "bad N", then "tcp BYTES udp DATAGRAMS" (what it echoed). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 6)
        return 2;
    uint64_t words = (uint64_t)atoi(argv[4]) << 17;
    double rate = atof(argv[5]);
    volatile uint64_t *m = malloc(words * 8 + 8);
    if (!m)
        return 3;
    for (uint64_t i = 0; i < words; i++)
        m[i] = i * 0x9E3779B97F4A7C15ull;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096))
        return 4;
    struct sockaddr_in ua = a;
    ua.sin_port = htons(atoi(argv[3]));
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    if (bind(u, (struct sockaddr *)&ua, sizeof ua))
        return 5;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    ev.data.fd = u;
    epoll_ctl(ep, EPOLL_CTL_ADD, u, &ev);
    printf("ready\n");
    fflush(stdout);
    /* Pages to dirty per 10 ms tick. */
    uint64_t per_tick = rate > 0 ? (uint64_t)(rate * 256 / 100) : 0;
    uint64_t pages = words / 512, next = 0;
    unsigned long long tcp = 0, udp = 0;
    double tick = now();
    char buf[65536];
    struct epoll_event evs[256];
    for (int running = 1; running;) {
        int n = epoll_wait(ep, evs, 256, 10);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int c = accept(l, NULL, NULL);
                if (c >= 0) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
            } else if (fd == u) {
                /* Every datagram waiting, not one per turn of the loop. */
                for (;;) {
                    struct sockaddr_in from;
                    socklen_t fl = sizeof from;
                    ssize_t got = recvfrom(u, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
                    if (got < 0)
                        break;
                    sendto(u, buf, got, 0, (struct sockaddr *)&from, fl);
                    udp++;
                }
            } else {
                ssize_t got = read(fd, buf, sizeof buf);
                if (got <= 0) {
                    close(fd);
                    continue;
                }
                /* "end\n" as the last line of what came (it may come with
                 * an earlier line in one read). */
                if (got >= 4 && memcmp(buf + got - 4, "end\n", 4) == 0 && (got == 4 || buf[got - 5] == '\n'))
                    running = 0;
                if (write(fd, buf, got) != got)
                    return 6;
                tcp += got;
            }
        }
        if (per_tick && now() - tick >= 0.01) {
            tick = now();
            for (uint64_t k = 0; k < per_tick && pages; k++, next = (next + 7919) % pages)
                m[next * 512] = m[next * 512];
        }
    }
    uint64_t bad = 0;
    for (uint64_t i = 0; i < words; i++)
        bad += m[i] != i * 0x9E3779B97F4A7C15ull;
    if (bad)
        printf("bad %lu\n", (unsigned long)bad);
    else
        printf("ok\n");
    printf("tcp %llu udp %llu\n", tcp, udp);
    return 0;
}
