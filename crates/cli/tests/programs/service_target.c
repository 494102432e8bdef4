/* The whole application a migration must move (tests/migrate.rs):
 *
 *   service_target ADDRESS TCP_PORT UDP_PORT MiB
 *
 * - MiB of memory holding a known pattern, rewritten all the time by a
 *   second thread (a page every quarter of a millisecond, each keeping
 *   its value, so the pages are dirtied and the pattern holds);
 * - a forked child, the accountant: for every line the server gets, the
 *   parent writes its length to the child through a pipe; the child adds
 *   them up and, when the pipe ends, sends the totals back through a
 *   second pipe and exits with 3 (and with 91 if its parent changed);
 * - an epoll loop serving any number of TCP connections line by line:
 *   "udp" answers with the datagrams waiting on the UDP socket ("udp N
 *   DATA..."), "end" answers "bye" and ends the loop, any other line is
 *   echoed and counted;
 * - a UDP socket, read only when asked.
 *
 * Prints "ready PID" once it listens; at the end "pid PID", "memory ok"
 * (or "memory bad N"), and "child exit E lines L bytes B". */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define K 0x9E3779B97F4A7C15ull
#define MAX_CONNS 1024

static volatile uint64_t *mem;
static uint64_t words;
static volatile int stop_writing;

static void *writer(void *arg) {
    (void)arg;
    struct timespec pause = {0, 250000};
    while (!stop_writing) {
        for (uint64_t w = 0; w < words && !stop_writing; w += 512) {
            mem[w] = w * K;
            nanosleep(&pause, NULL);
        }
    }
    return NULL;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w <= 0) return -1;
        c += w;
        n -= w;
    }
    return 0;
}

static void accountant(int in, int out, pid_t parent) {
    long lines = 0, bytes = 0;
    int len;
    while (read(in, &len, sizeof len) == sizeof len) {
        if (getppid() != parent) _exit(91);
        lines++;
        bytes += len;
    }
    long totals[2] = {lines, bytes};
    write_all(out, totals, sizeof totals);
    _exit(3);
}

struct conn {
    int fd;
    size_t have;
    char buf[4096];
};

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    words = (uint64_t)atoi(argv[4]) << 17;
    mem = malloc(words * 8);
    if (!mem) return 3;
    for (uint64_t i = 0; i < words; i++) mem[i] = i * K;

    int down[2], up[2];
    if (pipe(down) || pipe(up)) return 4;
    pid_t me = getpid();
    pid_t child = fork();
    if (child < 0) return 5;
    if (child == 0) {
        close(down[1]);
        close(up[0]);
        accountant(down[0], up[1], me);
    }
    close(down[0]);
    close(up[1]);

    pthread_t t;
    if (pthread_create(&t, NULL, writer, NULL)) return 6;

    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 256)) return 7;
    struct sockaddr_in u = a;
    u.sin_port = htons(atoi(argv[3]));
    int us = socket(AF_INET, SOCK_DGRAM, 0);
    if (bind(us, (struct sockaddr *)&u, sizeof u)) return 8;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev)) return 9;
    printf("ready %d\n", (int)getpid());

    int running = 1;
    while (running) {
        struct epoll_event got[64];
        int n = epoll_wait(ep, got, 64, -1);
        for (int i = 0; i < n && running; i++) {
            struct conn *c = got[i].data.ptr;
            if (!c) {
                int fd = accept(l, NULL, NULL);
                if (fd < 0) continue;
                c = calloc(1, sizeof *c);
                c->fd = fd;
                struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                continue;
            }
            ssize_t r = read(c->fd, c->buf + c->have, sizeof c->buf - c->have);
            if (r <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                free(c);
                continue;
            }
            c->have += r;
            char *nl;
            while ((nl = memchr(c->buf, '\n', c->have))) {
                size_t len = nl - c->buf + 1;
                if (len == 4 && memcmp(c->buf, "udp\n", 4) == 0) {
                    char out[4096];
                    int count = 0, at = 0;
                    char d[256];
                    ssize_t m;
                    at += snprintf(out + at, sizeof out - at, "udp");
                    char rest[3800] = "";
                    int rat = 0;
                    while ((m = recv(us, d, sizeof d - 1, MSG_DONTWAIT)) > 0) {
                        d[m] = 0;
                        count++;
                        rat += snprintf(rest + rat, sizeof rest - rat, " %s", d);
                    }
                    at += snprintf(out + at, sizeof out - at, " %d%s\n", count, rest);
                    write_all(c->fd, out, at);
                } else if (len == 4 && memcmp(c->buf, "end\n", 4) == 0) {
                    write_all(c->fd, "bye\n", 4);
                    running = 0;
                } else {
                    write_all(c->fd, c->buf, len);
                    int ilen = (int)len;
                    if (write_all(down[1], &ilen, sizeof ilen)) return 10;
                }
                memmove(c->buf, c->buf + len, c->have - len);
                c->have -= len;
            }
        }
    }
    stop_writing = 1;
    pthread_join(t, NULL);
    uint64_t bad = 0;
    for (uint64_t i = 0; i < words; i++)
        if (mem[i] != i * K) bad++;
    close(down[1]);
    long totals[2] = {-1, -1};
    if (read(up[0], totals, sizeof totals) != sizeof totals) totals[0] = -2;
    int status = 0;
    waitpid(child, &status, 0);
    printf("pid %d\n", (int)getpid());
    if (bad) printf("memory bad %llu\n", (unsigned long long)bad);
    else printf("memory ok\n");
    printf("child exit %d lines %ld bytes %ld\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1, totals[0], totals[1]);
    return 0;
}
