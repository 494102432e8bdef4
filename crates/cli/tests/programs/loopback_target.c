// A parent and its child talking over a loopback TCP connection: the
// parent listens on 127.0.0.1:PORT, the child connects, sends the numbers
// 0..N-1 (a few ahead, so that bytes are in flight) and checks that each
// comes back doubled; the parent answers each one. Prints "ready" once
// they are connected; at the end what the child found (its exit status),
// read by the parent's wait4.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define N 60

static int full(int fd, void *p, size_t n, int writing) {
    char *c = p;
    while (n > 0) {
        ssize_t r = writing ? write(fd, c, n) : read(fd, c, n);
        if (r <= 0) return -1;
        c += r;
        n -= r;
    }
    return 0;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7401;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) return 2;
    pid_t child = fork();
    if (child < 0) return 3;
    if (child == 0) {
        close(l);
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof a)) _exit(90);
        int sent = 0;
        for (; sent < 3; sent++)
            if (full(c, &sent, sizeof sent, 1)) _exit(91);
        for (int i = 0; i < N; i++) {
            int r;
            if (full(c, &r, sizeof r, 0)) _exit(92);
            if (r != 2 * i) _exit(93);
            if (sent < N) {
                if (full(c, &sent, sizeof sent, 1)) _exit(94);
                sent++;
            }
            usleep(20000);
        }
        _exit(7);
    }
    int s = accept(l, NULL, NULL);
    if (s < 0) return 4;
    close(l);
    printf("ready\n");
    for (int i = 0; i < N; i++) {
        int v;
        if (full(s, &v, sizeof v, 0)) break;
        v *= 2;
        if (full(s, &v, sizeof v, 1)) break;
        if (i % 20 == 19) printf("answered %d\n", i + 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    printf("child exit %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    return 0;
}
